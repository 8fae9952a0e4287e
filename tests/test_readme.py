"""The README stays true: every setting is in its configuration table, and the quickstart has the
two commands that CI and new users run."""

from __future__ import annotations

import re
from pathlib import Path

from bertq.settings import Settings

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_every_setting_is_in_the_configuration_table() -> None:
    documented = set(re.findall(r"^\| `(BERTQ_[A-Z0-9_]+)` \|", README, flags=re.M))
    expected = {f"BERTQ_{name.upper()}" for name in Settings.model_fields}
    assert expected - documented == set()
    assert documented - expected == {"BERTQ_TEST_REDIS_URL"}


def test_quickstart_has_exactly_the_two_commands() -> None:
    quickstart = README.split("## Quickstart", 1)[1].split("##", 1)[0]
    block = re.search(r"```sh\n(.*?)```", quickstart, flags=re.S)
    assert block is not None
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]
    assert "make test" in (Path(__file__).parents[1] / ".ci" / "run").read_text()

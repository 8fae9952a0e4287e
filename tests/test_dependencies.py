"""The dependency floors in pyproject.toml are the versions the code needs, and the installed (pinned)
versions meet them. Installs nothing: it reads pyproject.toml and the installed metadata."""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())

#: package -> (the lowest version the code works with, what in the code needs it)
NEEDED = {
    "transformers": ("4.56", "from_pretrained(dtype=...): older versions take torch_dtype"),
    "torch": ("2.5", "torch.OutOfMemoryError, caught to split batches"),
    "pydantic": ("2.6", "RootModel unions, model_validator"),
    "redis": ("5.0", "OutOfMemoryError and ReadOnlyError replies, BLMOVE, Sentinel-managed pools"),
    "celery": ("5.4", "app.Worker(exclude_queues=...), the control Panel, signals.worker_shutting_down"),
    "structlog": ("24.1", "stdlib.ProcessorFormatter(processor=..., foreign_pre_chain=...)"),
    "prometheus-client": ("0.20", "Gauge.set_function, start_http_server(registry=...)"),
    "httpx": ("0.27", "Client(follow_redirects=...), post(content=...)"),
    "fastapi": ("0.115", "Annotated[..., Depends()] route arguments and the lifespan handler (bertq.gateway)"),
    "uvicorn": ("0.30", "Config(timeout_graceful_shutdown=...) for `bertq serve`'s SIGTERM"),
}


def floors() -> dict[str, Requirement]:
    project = PYPROJECT["project"]
    requirements = [
        *project["dependencies"],
        *(r for extra in project["optional-dependencies"].values() for r in extra),
    ]
    return {Requirement(r).name.lower(): Requirement(r) for r in requirements}


@pytest.mark.parametrize("package", sorted(NEEDED))
def test_the_floor_is_what_the_code_needs(package: str) -> None:
    requirement = floors()[package]
    floor = min((Version(s.version) for s in requirement.specifier if s.operator == ">="), default=None)
    needed, why = NEEDED[package]
    assert floor is not None and floor >= Version(needed), (
        f"{package}>={needed} for {why}; pyproject says {requirement}"
    )


def test_the_installed_versions_meet_every_floor() -> None:
    for name, requirement in floors().items():
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        installed = version(name)
        assert requirement.specifier.contains(installed, prereleases=True), (
            f"{name} {installed} does not meet {requirement}"
        )

"""The backend tests' fixtures: a small calibration file and a converted-model cache per module."""

from __future__ import annotations

from pathlib import Path

import pytest
from bertq.workers.backends import calibration


@pytest.fixture(scope="module")
def small_calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 general-English lines: 48 to calibrate, 16 held out for the gate."""
    path = tmp_path_factory.mktemp("calibration") / "texts.txt"
    path.write_text("\n".join(calibration.shipped_texts(64, seed=5)) + "\n")
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("backend-cache")

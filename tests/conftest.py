"""Shared test fixtures: where the real data live, and whether DIALS is installed."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import jaxscale  # noqa: F401  (enables float64 before any test touches jax)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
SHARED = Path(os.environ.get("JAXSCALE_SHARED", REPO.parent / "shared"))
SHARED_DATA = SHARED / "data"
DIALS_PYTHON = "/usr/bin/python3"


def have_dials() -> bool:
    return shutil.which("dials.show") is not None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip with a visible reason where it is absent (a user's machine)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def examples_dir() -> Path:
    return EXAMPLES


requires_dials = pytest.mark.skipif(not have_dials(), reason="DIALS 3.12 not installed (apt-get install dials)")

"""Shared fixtures: every test is seeded; paths of the bundled data."""

from __future__ import annotations

import pytest

from diffkg_fast.data.codes import bundled_path
from diffkg_fast.utils.seed import seed_everything


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    seed_everything(0)


@pytest.fixture(scope="session")
def mimic3_demo_dir():
    """The bundled MIMIC-III demo tables (ODbL, see diffkg_fast/data/bundled/NOTICE)."""
    return bundled_path("mimic3-demo")

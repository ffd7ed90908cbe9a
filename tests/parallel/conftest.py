"""Fixtures of the multi-rank tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.parallel.launches import run_launches


@pytest.fixture(scope="session")
def parallel_launches(tmp_path_factory) -> Path:
    """The folder where the 1-, 2- and 4-rank launches saved their results (see launches.py)."""
    return run_launches(tmp_path_factory.mktemp("layouts"))

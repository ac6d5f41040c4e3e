"""Shared test fixtures. Tests are small (images of 32-64 px, few steps) so the suite runs in
minutes on 2 cores; tests that read ../shared/data skip when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Two xdist workers on two cores: one thread each avoids oversubscription.
torch.set_num_threads(1)
os.environ.setdefault("MPLBACKEND", "Agg")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """Path of ../shared/data; skips the test when it is not there (a user's fresh clone)."""
    if not (SHARED_DATA / "busbra" / "images").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA

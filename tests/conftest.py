"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data sets: ``../shared/data`` beside the project root (see /work/shared/data/README.md)."""
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not (path / "hh-rlhf-harmless" / "comparisons.jsonl.gz").is_file():
        pytest.skip(f"real data not found under {path}")
    return path

"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def data_mirror() -> Path:
    """Where the real datasets live: $BYOLLM_DATA_MIRROR, defaulting to ../shared/data next to the repo."""
    return Path(os.environ.get("BYOLLM_DATA_MIRROR", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    """Tiny Shakespeare (1.1 MB) from the data mirror; CPython's pydoc topics text if the file is absent."""
    path = data_mirror() / "tinyshakespeare.txt"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))

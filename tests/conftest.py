"""Fixtures for every test: short directories for unix sockets."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import tempdirs


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A fresh directory with a short path (a unix socket's path must fit in 108 bytes)."""
    with tempdirs.short_dir() as path:
        yield path

"""Directories with short paths: a unix socket's path must fit in 108 bytes, and pytest's tmp_path
(/tmp/pytest-of-root/pytest-123/test_a_long_test_name0/...) often does not leave room for it."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def short_tempdir(prefix: str = "ovmd-t-") -> str:
    """A fresh directory directly under /tmp; the caller removes it."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


@contextmanager
def short_dir(prefix: str = "ovmd-t-") -> Iterator[Path]:
    """A fresh directory directly under /tmp, removed with everything in it on the way out."""
    path = short_tempdir(prefix)
    try:
        yield Path(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)

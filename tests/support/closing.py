"""``with`` for the tests' objects that have a close()."""

from __future__ import annotations

from typing import Any


class Closing:
    """``with obj:`` gives ``obj`` and calls ``obj.close()`` on the way out, whatever happened."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

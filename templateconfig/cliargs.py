"""What the parsers of `ovm-template-config` and `ovm-chkconfig` share: a usage error raised as
Usage (each command prints it in one line, exit 2) rather than argparse's usage text and exit, and
the hidden --template-dir (default $OVM_TEMPLATE_DIR, else /etc/template.d) that tests and image
builds point elsewhere."""

from __future__ import annotations

import argparse
import os
from typing import Any

from . import TEMPLATE_DIR


class Usage(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_argument(
            "--template-dir",
            default=os.environ.get("OVM_TEMPLATE_DIR", TEMPLATE_DIR),
            help=argparse.SUPPRESS,
        )

    def error(self, message: str) -> None:  # type: ignore[override]
        raise Usage(message)

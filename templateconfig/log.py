"""The run log, /var/log/ovm-template-config.log as in the original: module names, outcomes and
one-line errors. Never a value: the key/values a run reads are not written anywhere."""

from __future__ import annotations

import os
import time

from . import LOG_FILE


class Log:
    def __init__(self, path: str | None = None) -> None:
        self.path = path or os.environ.get("OVM_TEMPLATE_CONFIG_LOG", LOG_FILE)

    def line(self, text: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError:
            return  # a read-only or missing /var/log must not stop a configuration
        try:
            os.write(fd, ("%s %s\n" % (stamp, text.replace("\n", " "))).encode("utf-8"))
        finally:
            os.close(fd)

"""Log lines for people: the long-running commands (``enrich run``, ``enrich serve``) say what
happens (the database went away, came back, rows were taken back) in one line each, on stderr.

Without this, Python's last-resort handler prints every warning with its traceback, and
psycopg_pool reports each failed reconnection attempt of a database restart: noise for a situation
the commands handle. Tracebacks and the driver's own messages appear with ENRICH_LOG_LEVEL=DEBUG.
"""

from __future__ import annotations

import logging
import sys

from shared.cli.text import visible

_HANDLER_NAME = "enrich-cli"


class _OneLine(logging.Formatter):
    """``warning: message``; the traceback only when debugging."""

    def __init__(self, with_tracebacks: bool) -> None:
        super().__init__()
        self._with_tracebacks = with_tracebacks

    def format(self, record: logging.LogRecord) -> str:
        # A message may carry a provider's error or a file name: controls shown, never obeyed.
        message = f"{record.levelname.lower()}: {visible(record.getMessage())}"
        if self._with_tracebacks and record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        return message


def configure_cli_logging(level: str) -> None:
    """One stderr handler on the root logger (idempotent); the driver's chatter only at DEBUG."""
    root = logging.getLogger()
    if any(h.get_name() == _HANDLER_NAME for h in root.handlers):
        return
    debug = level.upper() == "DEBUG"
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(_OneLine(with_tracebacks=debug))
    root.addHandler(handler)
    numeric = logging.getLevelName(level.upper())
    root.setLevel(numeric if debug else max(numeric, logging.WARNING))
    if not debug:
        logging.getLogger("psycopg").setLevel(logging.CRITICAL)

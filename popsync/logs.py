"""Logging set-up: one readable line per event on stderr, or JSON lines.

Nothing here formats secrets: callers never pass them.  Server text reaches
the log only through :func:`popsync.errors.escape_server_text` (escaped and
capped), so a hostile server cannot forge log lines or drive the terminal.

Two loggers: ``popsync`` (diagnostics and problems, on stderr) and
``popsync.report`` (a command's result lines, such as a poll's summary, on
stdout).  Both honour ``--log-format``; a JSON line carries the structured
fields a caller passes in ``extra`` (:data:`FIELDS`) as top-level keys.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import TextIO

#: ``extra`` keys copied into a JSON line as fields of their own.
FIELDS = (
    "account",
    "event",
    "result",
    "listed",
    "new",
    "fetched",
    "deleted",
    "skipped",
    "bytes",
    "remapped",
    "deferred",
    "refetched",
    "seconds",
    # the steps of a session (-v) and its dialog (-vv)
    "host",
    "port",
    "address",
    "tls_version",
    "cipher",
    "capabilities",
    "mechanism",
    "count",
    "direction",
    "line",
)

#: syslog priorities (RFC 5424 §6.2.1) of the logging levels, for sd-daemon(3) prefixes.
_PRIORITY = {logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}

REPORT_LOGGER = "popsync.report"
#: The steps of a session (INFO, ``-v``) and its dialog (DEBUG, ``-vv``).
STEPS_LOGGER = "popsync.steps"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the :data:`FIELDS` given."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=True)


class TextFormatter(logging.Formatter):
    """``popsync: LEVEL: message``; ``popsync: message`` for a record marked ``plain``
    (a command's one-line problem); the bare message for the report logger.

    With *journal* each line starts with its syslog priority (``<3>`` error ...),
    which journald strips and stores, so ``journalctl -p err`` finds errors.
    """

    def __init__(self, *, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.name == REPORT_LOGGER:
            line = message
        elif getattr(record, "plain", False):
            line = f"popsync: {message}"
        else:
            line = f"popsync: {record.levelname}: {message}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if self.journal:
            prefix = f"<{_PRIORITY.get(record.levelno, 3 if record.levelno > 40 else 7)}>"
            line = "\n".join(prefix + part for part in line.split("\n"))
        return line


def is_journal(stream: TextIO) -> bool:
    """True when *stream* is connected to journald: ``$JOURNAL_STREAM`` names its
    device and inode (systemd.exec(5)), so a pipe the service hands on is not."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in value.split(":"))
        info = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (info.st_dev, info.st_ino) == (device, inode)


def _handler(stream: TextIO, fmt: str) -> logging.Handler:
    handler = logging.StreamHandler(stream)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(journal=is_journal(stream)))
    return handler


def _install(name: str, handler: logging.Handler, level: int) -> None:
    logger = logging.getLogger(name)
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def _level(verbosity: int) -> int:
    return {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)


def setup_logging(
    *, verbosity: int = 0, fmt: str = "text", steps_verbosity: int | None = None
) -> None:
    """Configure the ``popsync`` logger: -1 errors only, 0 warnings, 1 info, 2 debug.

    The report logger (stdout) shows its lines unless *verbosity* is -1
    (``-q``: cron mails nothing unless something went wrong).  The steps
    logger follows *steps_verbosity* when given (the daemon logs its polls
    at INFO by default, but a session's steps only with ``-v``).
    """
    _install("popsync", _handler(sys.stderr, fmt), _level(verbosity))
    steps = logging.getLogger(STEPS_LOGGER)
    steps.setLevel(_level(verbosity if steps_verbosity is None else steps_verbosity))
    report_level = logging.ERROR if verbosity < 0 else logging.INFO
    _install(REPORT_LOGGER, _handler(sys.stdout, fmt), report_level)

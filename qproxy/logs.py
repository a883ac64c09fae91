"""How qproxy's processes log: to stderr, a line each, with its time and level, as text
or as JSON lines (``QPROXY_LOG_FORMAT=json``).

A JSON line carries the fields a log system filters on: ``time`` (UTC, ISO 8601),
``level``, ``logger``, ``message``, and where a line is about one file, ``key``, ``node``,
``gen``, ``attempt`` and ``duration_ms`` (every transfer line has them). qproxy's own
commands (the resolver, the worker, the sweep) set this up for the whole process; inside
an app, the middleware sets up only the ``qproxy`` loggers, and only for JSON (the app
owns its logging otherwise).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable
from typing import Any

from qproxy.config import Config

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FIELDS = ("key", "node", "gen", "attempt", "duration_ms", "size", "state", "error")


class Throttled:
    """A warning said at most once every ``every`` seconds, the next saying how many were
    held back: an outage (Redis away) is a line every few seconds, not one a request."""

    def __init__(
        self,
        logger: logging.Logger,
        every: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.every = every
        self.clock = clock
        self._next = -math.inf
        self._held = 0

    def warning(self, message: str, *args: object) -> None:
        now = self.clock()
        if now < self._next:
            self._held += 1
            return
        if self._held:
            message += " (%d more like it in the last %.0f s)"
            args = (*args, self._held, self.every)
        self._next, self._held = now + self.every, 0
        self.logger.warning(message, *args)


class JsonLines(logging.Formatter):
    """One JSON object a line."""

    def format(self, record: logging.LogRecord) -> str:
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, Any] = {
            "time": f"{when}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            if name in record.__dict__:
                out[name] = record.__dict__[name]
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class _Text(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{when}.{int(record.msecs):03d}Z"


def formatter(config: Config) -> logging.Formatter:
    return JsonLines() if config.log_format == "json" else _Text()


def setup(config: Config, *, whole_process: bool = True, level: int = logging.INFO) -> None:
    """Log to stderr in ``config.log_format``: every logger of the process (qproxy's own
    commands), or only qproxy's (``whole_process=False``: inside someone's app)."""
    target = logging.getLogger() if whole_process else logging.getLogger("qproxy")
    for handler in list(target.handlers):
        if getattr(handler, "_qproxy", False):
            target.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(config))
    handler._qproxy = True  # type: ignore[attr-defined]
    target.addHandler(handler)
    target.setLevel(level)
    if not whole_process:
        logging.getLogger("qproxy").propagate = False  # (one line, not also the app's)

"""Logging set-up: JSON lines in production, readable colours on a terminal.

Only the CLI calls ``configure``; a library user keeps whatever structlog set-up they have.
Standard-library logging (aio-pika, aiormq, asyncpg, redis) is routed through the same
renderer, so every line the process writes is one format: a JSON line in production, with
the bound context variables, ``level``, ``timestamp`` (ISO 8601 in UTC, always with
microseconds: ``2026-11-23T10:46:05.123456Z``) and, for an exception, ``exception``.

The daemon writes a ``task.done`` line per delivery, so this is on the hot path; structlog's
own processors and ``JSONRenderer`` cost within the noise of a hand-made renderer there
(``python -m bench.micro_ab``, issue 16), so they are used as they are.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


def configure(*, json: bool | None = None, level: str = "INFO") -> None:
    if json is None:
        json = not sys.stderr.isatty()
    renderer: Any = (structlog.processors.JSONRenderer() if json
                     else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        # not fmt="iso": isoformat() drops the fraction when it is .000000
        structlog.processors.TimeStamper(fmt="%Y-%m-%dT%H:%M:%S.%fZ", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.getLevelName(level))

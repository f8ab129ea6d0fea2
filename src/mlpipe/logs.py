"""Logging set-up: JSON lines in production, readable colours on a terminal.

Only the CLI calls ``configure``; a library user keeps whatever structlog set-up they have.
Standard-library logging (aio-pika, aiormq, asyncpg, redis) is routed through the same
renderer, so every line the process writes is one format: a JSON line in production.

The daemon writes a ``task.done`` line per delivery, so the JSON path is on the hot path
(``make bench``): lines are rendered by pydantic-core's serializer (already installed with
pydantic; about four times faster than ``json.dumps``) straight to bytes, and the timestamp is
formatted once per second rather than through ``datetime`` on every line.
"""

from __future__ import annotations

import contextvars
import json as _json
import logging
import sys
import time
from typing import Any

import structlog
from pydantic_core import PydanticSerializationError, to_json
from structlog.contextvars import STRUCTLOG_KEY_PREFIX as _BOUND
from structlog.contextvars import STRUCTLOG_KEY_PREFIX_LEN as _BOUND_LEN
from structlog.processors import add_log_level, format_exc_info


class Prepare:
    """The fields every line gets, in one processor instead of a chain of four: what
    ``merge_contextvars``, ``add_log_level``, ``TimeStamper(fmt="iso", utc=True)`` and, with
    ``exceptions``, ``format_exc_info`` add.

    ``timestamp`` is ISO 8601 in UTC with microseconds (``2026-11-23T10:46:05.123456Z``); the
    date and time of day are formatted once per second, each line only adds its microseconds.
    """

    def __init__(self, *, exceptions: bool) -> None:
        self._exceptions = exceptions
        self._second = -1
        self._prefix = ""

    def __call__(self, logger: Any, method_name: str, event_dict: Any) -> Any:
        for var, value in contextvars.copy_context().items():
            name = var.name
            if name.startswith(_BOUND) and value is not Ellipsis:
                event_dict.setdefault(name[_BOUND_LEN:], value)
        event_dict = add_log_level(logger, method_name, event_dict)
        now = time.time()
        second = int(now)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        event_dict["timestamp"] = f"{self._prefix}.{int((now - second) * 1e6):06d}Z"
        if self._exceptions and "exc_info" in event_dict:
            event_dict = format_exc_info(logger, method_name, event_dict)
        return event_dict


def _fallback(obj: Any) -> Any:
    """What structlog's JSON renderer does for an object JSON has no type for."""
    hook = getattr(obj, "__structlog__", None)
    return hook() if hook is not None else repr(obj)


class JsonRenderer:
    """One JSON object per event, as bytes (for ``BytesLogger``) or str (for the stdlib bridge).

    pydantic-core refuses a few values ``json.dumps`` takes (bytes that are not UTF-8, lone
    surrogates, keys it cannot stringify): such a line goes through ``json.dumps`` instead, so
    no line is lost to its content."""

    def __init__(self, *, as_bytes: bool) -> None:
        self._as_bytes = as_bytes

    def __call__(self, logger: Any, method_name: str, event_dict: Any) -> bytes | str:
        try:
            out = to_json(event_dict, fallback=_fallback)
        except (PydanticSerializationError, ValueError, TypeError):
            text = _json.dumps(event_dict, default=_fallback)
            return text.encode("utf-8", "backslashreplace") if self._as_bytes else text
        return out if self._as_bytes else out.decode()


def configure(*, json: bool | None = None, level: str = "INFO") -> None:
    if json is None:
        json = not sys.stderr.isatty()
    binary = getattr(sys.stderr, "buffer", None) if json else None
    renderer: Any = (JsonRenderer(as_bytes=False) if json
                     else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    # Our own lines skip the text layer: rendered to bytes, written to stderr's buffer (the
    # stdlib handler below flushes the text layer after each of its lines, so the order holds).
    structlog.configure(
        processors=[Prepare(exceptions=True),
                    JsonRenderer(as_bytes=True) if binary is not None else renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=(structlog.BytesLoggerFactory(file=binary) if binary is not None
                        else structlog.PrintLoggerFactory(file=sys.stderr)),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[Prepare(exceptions=False), structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.getLevelName(level))

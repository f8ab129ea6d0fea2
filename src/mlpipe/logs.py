"""Logging set-up: JSON lines in production, readable colours on a terminal.

Only the CLI calls ``configure``; a library user keeps whatever structlog set-up they have.
Standard-library logging (aio-pika, aiormq, asyncpg, redis) is routed through the same
renderer, so every line the process writes is one format: a JSON line in production.

The daemon writes a ``task.done`` line per delivery, so the JSON path is on the hot path
(``make bench``): lines are rendered by pydantic-core's serializer (already installed with
pydantic; about four times faster than ``json.dumps``) straight to bytes, the timestamp is
formatted once per second rather than through ``datetime`` on every line, and the lines of one
event-loop pass reach stderr in one write (``LoopFlushedLogger``) instead of one each.
"""

from __future__ import annotations

import asyncio
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


class LoopFlushedLogger:
    """structlog's ``BytesLogger`` with its flush deferred to the end of the event loop's
    current pass: a busy daemon writes a few hundred lines per pass, and one ``write(2)`` for
    all of them costs less than one each. A line is in the file before the loop waits again
    (within one pass of the loop: microseconds to a handler's blocking step); one logged with
    no running loop (start-up, a thread), and errors, are flushed at once, so what explains a
    crash is not left in the buffer. ``sys.stderr.flush()`` flushes these bytes too (they sit
    in its binary buffer), so lines from the stdlib bridge keep their order."""

    def __init__(self, file: Any) -> None:
        self._write = file.write
        self._flush = file.flush
        self._scheduled = False

    def msg(self, message: bytes) -> None:
        self._write(message + b"\n")
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._flush()
            return
        self._scheduled = True
        loop.call_soon(self._flush_pass)

    def _flush_pass(self) -> None:
        self._scheduled = False
        self._flush()

    def err(self, message: bytes) -> None:
        self._write(message + b"\n")
        self._flush()

    log = debug = info = warn = warning = msg
    fatal = failure = error = critical = exception = err


class LoopFlushedLoggerFactory:
    def __init__(self, file: Any) -> None:
        self._logger = LoopFlushedLogger(file)

    def __call__(self, *args: Any) -> LoopFlushedLogger:
        return self._logger


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
        logger_factory=(LoopFlushedLoggerFactory(binary) if binary is not None
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

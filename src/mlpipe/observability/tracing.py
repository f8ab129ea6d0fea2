"""W3C trace context through the pipeline, with OpenTelemetry when it is installed.

The incoming ``traceparent`` is always bound to the task's log lines and copied into its
result events. With the optional ``otel`` extra (``opentelemetry-api``), each handler run is
also a span that continues the incoming trace; without it this module costs one import check,
and the code runs unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

try:  # optional dependency
    from opentelemetry import trace as _otel_trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _PROPAGATOR: Any = TraceContextTextMapPropagator()
    _TRACER: Any = _otel_trace.get_tracer("mlpipe")
except ImportError:  # pragma: no cover - exercised where the extra is absent
    _PROPAGATOR = None
    _TRACER = None


def enabled() -> bool:
    return _TRACER is not None


@contextlib.contextmanager
def task_span(name: str, traceparent: str | None, attributes: dict[str, Any]) -> Iterator[None]:
    """A span for one handler run, child of the producer's trace when it sent one."""
    if _TRACER is None:
        yield
        return
    carrier = {"traceparent": traceparent} if traceparent else {}
    ctx = _PROPAGATOR.extract(carrier)
    with _TRACER.start_as_current_span(name, context=ctx, attributes=attributes):
        yield

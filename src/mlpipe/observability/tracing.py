"""W3C trace context through the pipeline, with OpenTelemetry when it is installed.

The incoming ``traceparent`` is always bound to the task's log lines and copied into its
result events. With the optional ``otel`` extra (``opentelemetry-api``) and a tracer provider
configured (an SDK, in code or through ``OTEL_PYTHON_TRACER_PROVIDER``), each handler run is
also a span that continues the incoming trace.

Without a configured provider the API's spans record nothing, yet starting one and attaching
its context costs ~7 µs per delivery (``make bench``): ``task_span`` then does no span work at
all. The provider is looked up until a real one appears (it can be set after import, and only
once), then remembered; the lookup reads the API's global slot rather than calling
``get_tracer_provider``, which consults ``os.environ`` on every call while none is set.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

try:  # optional dependency
    from opentelemetry import trace as _otel_trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _PROPAGATOR: Any = TraceContextTextMapPropagator()
    _TRACER: Any = _otel_trace.get_tracer("mlpipe")
    #: Providers whose spans record nothing: the API's default proxy and its no-op.
    _NON_RECORDING: tuple[type, ...] = (_otel_trace.ProxyTracerProvider,
                                        _otel_trace.NoOpTracerProvider)
except ImportError:  # pragma: no cover - exercised where the extra is absent
    _PROPAGATOR = None
    _TRACER = None
    _NON_RECORDING = ()

_NO_SPAN: AbstractContextManager[None] = contextlib.nullcontext()
#: Set once a real tracer provider was seen; the global provider can be set only once.
_provider_seen = False


def enabled() -> bool:
    """The OpenTelemetry API is installed."""
    return _TRACER is not None


#: ``get_tracer_provider`` has been called once (it loads ``OTEL_PYTHON_TRACER_PROVIDER``).
_env_read = False


def recording() -> bool:
    """A tracer provider that records spans is configured."""
    global _provider_seen, _env_read
    if _provider_seen:
        return True
    if _TRACER is None:
        return False
    if _env_read and getattr(_otel_trace, "_TRACER_PROVIDER", ...) is None:
        return False  # still nothing set: the common case, without the environment lookup
    _env_read = True
    _provider_seen = not isinstance(_otel_trace.get_tracer_provider(), _NON_RECORDING)
    return _provider_seen


def task_span(name: str, traceparent: str | None,
              attributes: dict[str, Any]) -> AbstractContextManager[None]:
    """A span for one handler run, child of the producer's trace when it sent one; nothing
    when no provider records spans."""
    if _provider_seen or recording():
        return _span(name, traceparent, attributes)
    return _NO_SPAN


@contextlib.contextmanager
def _span(name: str, traceparent: str | None, attributes: dict[str, Any]) -> Iterator[None]:
    carrier = {"traceparent": traceparent} if traceparent else {}
    ctx = _PROPAGATOR.extract(carrier)
    with _TRACER.start_as_current_span(name, context=ctx, attributes=attributes):
        yield

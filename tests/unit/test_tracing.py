"""With OpenTelemetry present, a handler run is a span continuing the producer's trace."""

from __future__ import annotations

import os
import subprocess
import sys

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mlpipe.observability import tracing

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def test_span_continues_incoming_trace() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    assert tracing.enabled()
    with tracing.task_span("mlpipe.embed_vectors", f"00-{TRACE_ID}-00f067aa0ba902b7-01",
                           {"mlpipe.share_id": "s1"}):
        pass
    [span] = exporter.get_finished_spans()
    assert span.name == "mlpipe.embed_vectors"
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.parent is not None
    assert format(span.parent.span_id, "016x") == "00f067aa0ba902b7"
    assert span.attributes == {"mlpipe.share_id": "s1"}


_LATE_PROVIDER = """
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mlpipe.observability import tracing

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
assert tracing.enabled() and not tracing.recording()
with tracing.task_span("mlpipe.embed_vectors", TP, {}):
    # no span work at all: the incoming trace did not even become the current context
    assert trace.get_current_span() is trace.INVALID_SPAN
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
assert tracing.recording()
with tracing.task_span("mlpipe.embed_vectors", TP, {}):
    assert trace.get_current_span().is_recording()
[span] = exporter.get_finished_spans()
assert format(span.context.trace_id, "032x") == "4bf92f3577b34da6a3ce929d0e0e4736"
print("ok")
"""


def test_no_span_work_until_a_provider_is_configured() -> None:
    """Without an SDK a handler run starts no span; a provider set later (the global one can
    be set once, in a fresh process here) gets real spans from then on."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", _LATE_PROVIDER], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"

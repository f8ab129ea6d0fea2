"""With OpenTelemetry present, a handler run is a span continuing the producer's trace."""

from __future__ import annotations

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

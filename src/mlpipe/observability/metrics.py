"""Prometheus metrics of one daemon.

Every metric lives in a registry owned by the daemon (not the process-global default), so
several daemons in one process (tests, embedding) do not mix their counts. Names are the
contract with ``deploy/grafana`` and ``deploy/prometheus``; a test checks that every metric a
dashboard or alert queries is exported here.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: Task durations span milliseconds (embeddings) to many minutes (transcription).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
                    600, 1200, 1800)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.tasks = Counter(
            "mlpipe_tasks", "Deliveries settled, by outcome (ack, retry, dead_letter, requeue).",
            ["task_type", "queue", "outcome"], registry=r)
        self.duration = Histogram(
            "mlpipe_task_duration_seconds", "Wall time of a delivery from start to settle.",
            ["task_type", "queue"], buckets=DURATION_BUCKETS, registry=r)
        self.in_flight = Gauge("mlpipe_tasks_in_flight", "Deliveries being processed.",
                               ["queue"], registry=r)
        self.retries = Counter("mlpipe_retries", "Retries scheduled, by reason.",
                               ["task_type", "reason"], registry=r)
        self.dead_letters = Counter("mlpipe_dead_letters", "Dead-lettered deliveries by reason.",
                                    ["task_type", "reason"], registry=r)
        self.skipped = Counter("mlpipe_skipped", "Deliveries acked without running the handler "
                               "(duplicate in flight, already done, superseded, fenced).",
                               ["task_type", "reason"], registry=r)
        self.cost = Counter("mlpipe_cost_usd", "Money spent on paid calls.",
                            ["task_type", "model"], registry=r)
        self.units = Counter("mlpipe_units_processed",
                             "Tokens and audio seconds processed by paid calls.",
                             ["task_type", "unit_kind"], registry=r)
        self.budget_remaining = Gauge(
            "mlpipe_budget_remaining_usd", "Budget left in the rolling window at the last check.",
            ["task_type", "window"], registry=r)
        self.budget_used_ratio = Gauge(
            "mlpipe_budget_used_ratio", "Share of the budget spent in the rolling window.",
            ["task_type", "window"], registry=r)
        self.embedding_batch = Histogram(
            "mlpipe_embedding_batch_size", "Texts per embedding backend call.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        # broker and producer
        self.connected = Gauge("mlpipe_broker_connected",
                               "1 while the connection is up.", ["connection"], registry=r)
        self.consuming = Gauge("mlpipe_consuming", "1 while the queue's subscription is active.",
                               ["queue"], registry=r)
        self.reconnects = Gauge("mlpipe_broker_reconnects",
                                "Successful reconnects since start.", ["connection"], registry=r)
        self.publish_buffer = Gauge("mlpipe_publish_buffer_size",
                                    "Publishes waiting for the broker.", registry=r)
        self.pending_confirms = Gauge("mlpipe_publish_pending_confirms",
                                      "Publishes waiting for a confirm.", registry=r)
        self.confirm_timeouts = Gauge("mlpipe_publish_confirm_timeouts",
                                      "Confirm timeouts since start.", registry=r)
        self.circuit_open = Gauge("mlpipe_publish_circuit_open",
                                  "1 while the producer fails fast.", registry=r)
        self.workflows = Gauge("mlpipe_workflow_shares", "Shares per video workflow state.",
                               ["state"], registry=r)
        self.oldest_workflow_age = Gauge(
            "mlpipe_workflow_oldest_age_seconds",
            "Age of the oldest share still in a non-final workflow state.", registry=r)

    def names(self) -> set[str]:
        """Every series name this daemon can export, labelled ones included before their first
        sample (``_total`` for counters; ``_bucket``, ``_sum``, ``_count`` for histograms)."""
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                    "gauge": ("",)}
        out: set[str] = set()
        for metric in self.registry.collect():
            for suffix in suffixes.get(metric.type, ("",)):
                out.add(metric.name + suffix)
        return out

"""The Celery baseline, configured as the system mlpipe replaces was.

``celery -A bench.celery_app worker -P prefork -c 2 -Q <queue>`` with: a quorum queue,
``confirm_publish``, ``task_acks_late``, ``worker_prefetch_multiplier`` 8 and
``worker_detect_quorum_queues`` (Celery then uses per-consumer QoS, which quorum queues need).
No result backend (the original stored results itself). Everything else is Celery's default.

The task does nothing but note the time in a small shared-memory record per pool process
(``BENCH_CELERY_STATS``/<pid>: count, first start, last finish on the system-wide monotonic
clock), which the bench reads to time the drain. A memory write costs well under a
microsecond, so the baseline is not slowed by being watched.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from typing import Any

from celery import Celery  # type: ignore[import-untyped]
from celery.signals import worker_process_init  # type: ignore[import-untyped]
from kombu import Exchange, Queue  # type: ignore[attr-defined]

#: count (int64), first task start, last task end (float64 seconds, ``time.monotonic``).
RECORD = struct.Struct("<qdd")

QUEUE = os.environ.get("BENCH_CELERY_QUEUE", "bench.celery")
TASK_NAME = "bench.noop"

app = Celery("bench", broker=os.environ.get("BENCH_CELERY_BROKER", "amqp://127.0.0.1//"))
app.conf.update(
    task_queues=[Queue(QUEUE, Exchange(QUEUE, type="direct"),  # type: ignore[no-untyped-call]
                       routing_key=QUEUE, durable=True,
                       queue_arguments={"x-queue-type": "quorum"})],
    task_default_queue=QUEUE,
    task_acks_late=True,
    worker_prefetch_multiplier=8,
    worker_detect_quorum_queues=True,
    broker_transport_options={"confirm_publish": True},
    broker_connection_retry_on_startup=True,
    task_ignore_result=True,
    task_serializer="json",
    accept_content=["json"],
)


class _Stats:
    """This pool process's record; opened when the process starts."""

    mm: mmap.mmap | None = None
    count = 0
    first = 0.0


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _open_stats(**_: Any) -> None:
    folder = os.environ.get("BENCH_CELERY_STATS")
    if not folder:
        return
    path = os.path.join(folder, str(os.getpid()))
    with open(path, "wb") as f:
        f.write(b"\0" * RECORD.size)
    with open(path, "r+b") as f:
        _Stats.mm = mmap.mmap(f.fileno(), RECORD.size)


@app.task(name=TASK_NAME, ignore_result=True)  # type: ignore[untyped-decorator]
def noop(task: dict[str, Any]) -> None:
    """The no-op handler: the task arrives JSON-decoded, as Celery always delivers it."""
    now = time.monotonic()
    _Stats.count += 1
    if _Stats.count == 1:
        _Stats.first = now
    if _Stats.mm is not None:
        RECORD.pack_into(_Stats.mm, 0, _Stats.count, _Stats.first, time.monotonic())

"""The Celery baseline, configured as the system mlpipe replaces was.

``celery -A bench.celery_app worker -P prefork -c 2 -Q <queue>`` with: a quorum queue,
``confirm_publish``, ``task_acks_late``, ``worker_prefetch_multiplier`` 8 and
``worker_detect_quorum_queues`` (Celery then uses per-consumer QoS, which quorum queues need).
No result backend (the original stored results itself). Everything else is Celery's default;
the full-path worker also gets ``--max-tasks-per-child 50`` (``bench.celery_full``).

Two tasks:

* ``bench.noop`` does nothing (workload 1);
* ``bench.full`` is the original system's full path (workload 2): its Redis lock through
  ``celery-singleton`` (the original's choice; ``SET key task_id NX EX``, released by
  ``DEL`` when the task ends, keyed on task type and share as mlpipe's lock is), the
  stored-result check and the upsert of the same ``ml_results`` row with a synchronous
  psycopg 3 connection (autocommit: the upsert is its own transaction, one round trip), and
  the same ``completed`` event, published through Celery's own producer pool with publisher
  confirms to the events exchange. No outbox and no fencing token: the original had neither.
  One Postgres connection per pool process, opened by its first task (a process replaced
  after 50 tasks opens a new one, as the original did).

Each task notes the time in a small shared-memory record per pool process
(``BENCH_CELERY_STATS``/<pid>: count, first start, last finish on the system-wide monotonic
clock), which the bench reads to time the drain. A memory write costs well under a
microsecond, so the baseline is not slowed by being watched.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import time
import uuid
from typing import Any

from celery import Celery  # type: ignore[import-untyped]
from celery.signals import worker_process_init  # type: ignore[import-untyped]
from celery_singleton import Singleton  # type: ignore[import-untyped]
from kombu import Exchange, Queue  # type: ignore[attr-defined]

#: count (int64), first task start, last task end (float64 seconds, ``time.monotonic``).
RECORD = struct.Struct("<qdd")

QUEUE = os.environ.get("BENCH_CELERY_QUEUE", "bench.celery")
TASK_NAME = "bench.noop"
FULL_TASK_NAME = "bench.full"
#: The full path's stores and event exchange (set by ``bench.celery_full``).
DSN = os.environ.get("BENCH_CELERY_DSN", "")
SCHEMA = os.environ.get("BENCH_CELERY_SCHEMA", "public")
EVENTS_EXCHANGE = os.environ.get("BENCH_CELERY_EVENTS_EXCHANGE", "mlpipe.events")
RESULT = {"ok": True, "vector_count": 1}
_STORED = "SELECT input_hash FROM ml_results WHERE share_id = %s AND task_type = %s"
_UPSERT = """
INSERT INTO ml_results (share_id, task_type, input_hash, result_data, model_version,
                        processing_ms, cost_usd)
VALUES (%s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (share_id, task_type) DO UPDATE SET
    input_hash = EXCLUDED.input_hash, result_data = EXCLUDED.result_data,
    model_version = EXCLUDED.model_version, processing_ms = EXCLUDED.processing_ms,
    cost_usd = EXCLUDED.cost_usd, updated_at = now()
"""

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
    singleton_backend_url=os.environ.get("BENCH_CELERY_REDIS", "redis://127.0.0.1:6379/0"),
    singleton_key_prefix=os.environ.get("BENCH_CELERY_LOCK_PREFIX", "SINGLETONLOCK_"),
    singleton_lock_expiry=90,  # s; mlpipe's lock TTL for this task type
)


class _Stats:
    """This pool process's record; opened when the process starts."""

    mm: mmap.mmap | None = None
    count = 0
    first = 0.0

    @classmethod
    def started(cls) -> None:
        if cls.count == 0 and cls.first == 0.0:
            cls.first = time.monotonic()

    @classmethod
    def finished(cls) -> None:
        cls.count += 1
        if cls.mm is not None:
            RECORD.pack_into(cls.mm, 0, cls.count, cls.first, time.monotonic())


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
    _Stats.started()
    _Stats.finished()


class _Db:
    """This pool process's Postgres connection (psycopg 3, autocommit)."""

    conn: Any = None

    @classmethod
    def get(cls) -> Any:
        if cls.conn is None:
            import psycopg

            cls.conn = psycopg.connect(DSN, autocommit=True,
                                       options=f"-c search_path={SCHEMA},public")
        return cls.conn


class LockedTask(Singleton):  # type: ignore[misc]
    """celery-singleton's lock, taken by the worker as the task starts (``Singleton`` alone
    takes it in ``apply_async``, on the producer's side) and keyed on ``(taskType, shareId)``
    through its own ``generate_lock``; released by its own ``unlock`` when the task ends."""

    abstract = True

    def lock_key(self, doc: dict[str, Any]) -> str:
        return str(self.generate_lock(self.name, [doc["taskType"], doc["shareId"]]))

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        self.unlock(self.lock_key(args[0]))
        _Stats.finished()

    def on_failure(self, exc: Any, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        self.unlock(self.lock_key(args[0]))


@app.task(name=FULL_TASK_NAME, base=LockedTask, bind=True,  # type: ignore[untyped-decorator]
          ignore_result=True)
def full(self: LockedTask, task: dict[str, Any]) -> None:
    """Lock, stored-result check, upsert, confirmed event; the lock is released and the
    record written in ``on_success``, then Celery acks (``acks_late``)."""
    _Stats.started()
    share, task_type = task["shareId"], task["taskType"]
    if not self.aquire_lock(self.lock_key(task), self.request.id):
        raise RuntimeError(f"lock for {task_type}/{share} unexpectedly held")
    digest = hashlib.sha256(json.dumps(task["payload"], sort_keys=True, separators=(",", ":"))
                            .encode()).hexdigest()[:32]
    db = _Db.get()
    stored = db.execute(_STORED, (share, task_type)).fetchone()
    if stored is not None and stored[0] == digest:
        return
    from psycopg.types.json import Jsonb

    db.execute(_UPSERT, (share, task_type, digest, Jsonb(RESULT), "bench", 0, 0))
    event = {"version": "1.0", "shareId": share, "taskType": task_type, "status": "completed",
             "resultRef": {"table": "ml_results", "shareId": share, "taskType": task_type},
             "summary": dict(RESULT), "costUsd": 0.0,
             "correlationId": task["metadata"].get("correlationId"),
             "messageId": self.request.id, "occurredAt": time.time()}
    with self.app.producer_pool.acquire(block=True) as producer:
        producer.publish(event, exchange=EVENTS_EXCHANGE, routing_key=f"ml.result.{task_type}",
                         serializer="json", delivery_mode=2, declare=[],
                         message_id=uuid.uuid4().hex, type="ml.result",
                         correlation_id=event["correlationId"])

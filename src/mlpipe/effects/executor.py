"""Exactly-once effects around a handler run.

The order is what makes double-fires cheap and crashes harmless:

1. **lock** ``(taskType, shareId)`` in Redis. Held by another worker for the *same* input
   from a *different* message: a concurrent duplicate, acked (the holder's own delivery stays
   unacked until it finishes, and is redelivered if the holder dies: nothing is lost). Held for
   another input, or by this very message (its earlier delivery's worker died): deferred until
   the lock frees, without using up retries;
2. **covered**: a workflow watching the task may say it moved past it (``hooks.Workflow``);
   else the **stored result** with the same input hash (checked under the lock, so a duplicate that
   raced a just-finished run sees its result): ack without running. ``forceRecompute`` skips
   this check;
3. **budget** pre-flight: reserve the estimated cost or refuse;
4. **handler** under its time limit, the lock renewed meanwhile. A lock lost while the
   handler awaits cancels it (it would only spend more money on work that is no longer its
   own) and the delivery is deferred: whether someone else took the lock over or Redis merely
   forgot it, the deferred copy meets the lock and the stored-result check and is acked, or
   runs, accordingly, without using up retries;
5. **persist** result + cost entries + reservation release + outbox (result event, follow-up
   tasks) in one transaction, retried in-process for ``persist_retry_s`` so a Postgres blip
   does not throw away paid work; if it still fails, the result is **parked** in Redis and the
   retry stores it instead of running the handler again (``parking.py``). The write carries
   the lease's fencing token: a run that lost its lock without noticing in time (a stalled
   event loop, a handler that would not be cancelled) is refused when a newer holder's result
   is stored, and then stores, announces and charges nothing (``result.fenced``); its
   delivery is acked, the newer holder's own delivery owns the work. The budget reservation
   it took stays until it ages out of the window: that money was spent;
6. **publish** the outbox (confirmed); a redelivery that finds the result stored does this too,
   so a crash between commit and publish delays an event but never loses it;
7. release the lock; the caller acks.

The Postgres unique key on ``(share_id, task_type)`` is the last line behind all of this.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable

import asyncpg
import structlog
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from mlpipe.batching import GroupCommit
from mlpipe.contract.models import Task
from mlpipe.errors import Deferred, PublishError, TransientError
from mlpipe.execution import Bindings, Runtime, run_handler
from mlpipe.handlers import HandlerResult, HandlerSpec, TaskContext
from mlpipe.idempotency.lock import LockManager
from mlpipe.settings import Settings
from mlpipe.store import outbox, results
from mlpipe.store.pool import UNAVAILABLE, unavailable_is_transient
from mlpipe.store.results import FenceRefused
from mlpipe.worker.outcome import DeliveryProcessor, Skip

from .budget import BudgetGuard
from .events import OutboxRelay, add_completed, new_completed
from .hooks import ControlHandler, ControlProcessor, Workflow, WorkflowEnv
from .parking import Parked, ResultParking

log = structlog.get_logger(__name__)

#: Lock TTL as a multiple of the handler's expected runtime (renewed while it runs).
LOCK_TTL_FACTOR = 1.5
#: Most results (with their events) one statement stores: concurrent deliveries' writes are
#: committed together (``mlpipe.batching.GroupCommit``), each delivery still acked after its own.
SAVE_BATCH = 64
#: Most stored-result checks one statement answers.
CHECK_BATCH = 128
#: Longest wait before a deferred delivery looks at the lock again.
MAX_DEFER_S = 30.0
#: Failures of the persisting transaction that are retried in-process: the database being
#: unreachable, and asyncpg's "cannot switch to state ...; another operation is in progress",
#: which is what a connection that broke mid-query reports (the pool discards it on release).
PERSIST_RETRYABLE: tuple[type[BaseException], ...] = (
    *UNAVAILABLE, asyncpg.exceptions.InternalClientError)


class EffectsExecutor:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, locks: LockManager,
                 budget: BudgetGuard, *, parking: ResultParking | None = None) -> None:
        self._settings = settings
        self._pool = pool
        self._locks = locks
        self._budget = budget
        self._parking = parking
        self._relay: OutboxRelay | None = None
        self._events_exchange = ""
        self._workflows: tuple[Workflow, ...] = ()
        self._env: WorkflowEnv | None = None
        #: Results with their events, from concurrent deliveries, one statement at a time.
        self._saves: GroupCommit[results.EventedResult, list[outbox.OutboxMessage]] = \
            GroupCommit(self._save_batch, max_items=SAVE_BATCH, concurrency=2,
                        key=lambda r: (r.share_id, r.task_type))
        #: Stored-result checks of concurrent deliveries, one statement at a time.
        self._checks: GroupCommit[tuple[str, str], str | None] = \
            GroupCommit(self._check_batch, max_items=CHECK_BATCH, concurrency=2)

    def bind(self, runtime: Runtime) -> Bindings:
        """Called once by the daemon: result events and follow-up tasks leave through its
        producer, budget checks report to its metrics, and the registry's workflows are
        called around the tasks they watch."""
        topo = runtime.producer.topology
        self._relay = OutboxRelay(self._pool, runtime.producer)
        self._events_exchange = topo.events_exchange
        self._budget.metrics = runtime.metrics
        self._workflows = tuple(runtime.workflows)
        self._env = WorkflowEnv(topo.tasks_exchange, topo.delay_exchange, topo.workflow_queue,
                                topo)
        sweep = (self._sweep_outbox,) if self._settings.outbox_sweep_s > 0 else ()
        if not self._workflows:
            return Bindings(background=sweep)
        control: dict[str, ControlHandler] = {}
        for workflow in self._workflows:
            control.update(workflow.control)
        processors: dict[str, DeliveryProcessor] = {}
        if control:
            processors[topo.workflow_queue] = ControlProcessor(self._settings, self._pool,
                                                               control)
        metrics = runtime.metrics

        async def collect() -> None:
            for workflow in self._workflows:
                await workflow.collect_metrics(self._pool, metrics)

        return Bindings(control_processors=processors, on_dead_letter=self._on_dead_letter,
                        collect_metrics=collect, background=sweep)

    async def _sweep_outbox(self) -> None:
        """Events are written with their result and published before the ack, so a crash
        delays one until the redelivery flushes it. A delivery that is lost after its result
        committed (dead-lettered by the broker's delivery limit) has no redelivery: this loop
        publishes what stayed unpublished past ``outbox_sweep_s`` (at least once, under the
        event's own message id)."""
        period = self._settings.outbox_sweep_s
        while True:
            await asyncio.sleep(period)
            if self._relay is None:
                continue
            try:
                owed = await outbox.owed(self._pool, period)
                if owed:
                    sent = await self._relay.publish(owed)
                    log.warning("outbox.owed_published", count=sent)
            except Exception as exc:  # the next sweep tries again
                log.warning("outbox.sweep_failed", error=repr(exc))

    async def execute(self, task: Task, spec: HandlerSpec,
                      ctx: TaskContext) -> HandlerResult | Skip:
        digest = results.input_hash(task)
        tt = task.task_type.value
        ttl = max(1.0, spec.expected_runtime_s * LOCK_TTL_FACTOR)
        parked_key = self._parking.key(tt, task.share_id) if self._parking else None
        lease = await self._locks.acquire(tt, task.share_id, ttl_s=ttl,
                                          tag=f"{digest}/{ctx.message_id}", peek=parked_key)
        if lease is None:
            if await self._is_concurrent_duplicate(tt, task.share_id, digest, ctx):
                ctx.log.info("task.duplicate_in_flight")
                return Skip("duplicate_in_flight")
            raise Deferred(f"{tt} for {task.share_id} is locked by another run",
                           reason="lock_contention", delay_s=min(ttl, MAX_DEFER_S))
        async with lease:
            watching = [w for w in self._workflows if w.watches(task)]
            covered = await self._covered(task, digest, ctx, watching)
            if covered is not None:
                return Skip(covered)
            if watching:
                await self._before_run(task, watching)
            parked = self._find_parked(task, digest, ctx, lease.peeked)
            if parked is not None:  # paid for by an earlier delivery whose store failed
                return await self._store_parked(task, parked, digest, ctx, lease.fence,
                                                watching)
            reservation = await self._budget.reserve(task, spec)
            started = time.monotonic()
            try:
                with lease.cancel_on_loss(retry_in_s=min(ttl, MAX_DEFER_S)):
                    result = await run_handler(task, spec, ctx, self._settings.handler_timeout_s)
            except BaseException:
                await asyncio.shield(self._release_quietly(reservation))
                raise
            elapsed_ms = int((time.monotonic() - started) * 1000)
            if lease.lost:
                ctx.log.warning("task.lock_lost_during_run", fence=lease.fence)
            try:
                pending = await asyncio.shield(self._persist(task, result, digest, elapsed_ms,
                                                             reservation, ctx.message_id,
                                                             lease.fence, watching))
            except FenceRefused as refused:
                return await self._refused(task, result, refused, ctx)
            except BaseException:
                await asyncio.shield(self._park(task, digest, result, elapsed_ms, ctx))
                raise
            await self._publish(pending)
            return result

    async def _store_parked(self, task: Task, parked: Parked, digest: str, ctx: TaskContext,
                            fence: int, watching: list[Workflow]) -> HandlerResult | Skip:
        ctx.log.info("task.parked_result_stored", processing_ms=parked.processing_ms)
        try:
            pending = await asyncio.shield(self._persist(
                task, parked.result, digest, parked.processing_ms, None, ctx.message_id, fence,
                watching))
        except FenceRefused as refused:
            return await self._refused(task, parked.result, refused, ctx)
        await self._unpark(task)
        await self._publish(pending)
        return parked.result

    async def _refused(self, task: Task, result: HandlerResult, refused: FenceRefused,
                       ctx: TaskContext) -> HandlerResult | Skip:
        """The fence kept the stored row. Written under this very lease (an attempt that
        committed but whose reply was lost): a success whose events may still be pending.
        Written under a newer lease: the newer holder's result and event stand, this run
        stores and announces nothing, and the delivery is acked without a second event."""
        if refused.stored_fence == refused.fence:
            await self._flush(task)
            return result
        ctx.log.warning("result.fenced", fence=refused.fence, stored_fence=refused.stored_fence)
        return Skip("fenced")

    async def _covered(self, task: Task, digest: str, ctx: TaskContext,
                       watching: list[Workflow]) -> str | None:
        """Under the lock: is the work covered already (a workflow moved past it, or a result
        of this very input is stored)? The reason to skip it, or None."""
        if watching:
            async with unavailable_is_transient("workflow check"):
                for workflow in watching:
                    reason = await workflow.skip_reason(self._pool, task)
                    if reason is not None:
                        ctx.log.info("task.superseded", workflow=workflow.name, why=reason)
                        return reason
        if not task.payload.options.force_recompute:
            async with unavailable_is_transient("stored-result check"):
                stored = await self._checks.submit((task.share_id, task.task_type.value))
            if stored == digest:
                ctx.log.info("task.already_done")
                await self._flush(task)  # events a crash kept from going out
                return "already_done"
        return None

    async def _before_run(self, task: Task, watching: list[Workflow]) -> None:
        """The workflows' ``before_run`` in one transaction; what they queued (a deadline) is
        published before the handler runs."""
        assert self._env is not None
        async with unavailable_is_transient("workflow start"), self._pool.acquire() as conn, \
                conn.transaction():
            for workflow in watching:
                await workflow.before_run(conn, task, self._env)
        await self._flush(task)

    async def _on_dead_letter(self, task: Task, reason: str) -> None:
        """A task failed for good: the workflows watching it fall back."""
        watching = [w for w in self._workflows if w.watches(task)]
        if not watching:
            return
        async with unavailable_is_transient("workflow fallback"), \
                self._pool.acquire() as conn, conn.transaction():
            for workflow in watching:
                await workflow.on_dead_letter(conn, task, reason)

    async def _is_concurrent_duplicate(self, task_type: str, share_id: str, digest: str,
                                       ctx: TaskContext) -> bool:
        """Ack only a *different* message with the *same* input: its work is fully covered by
        the holder's own delivery, which stays unacked until done and is redelivered if the
        holder dies. The holder's own message coming back (same message id: the holder died
        or lost its channel) must wait for the lock instead, or it would be lost."""
        holder = await self._locks.holder(task_type, share_id)
        if holder is None or ctx.message_id is None:
            return False
        held_digest, _, held_message = holder.rpartition(":")[2].partition("/")
        return held_digest == digest and held_message != ctx.message_id

    async def _flush(self, task: Task) -> None:
        if self._relay is None:
            return
        async with unavailable_is_transient("publishing result events"):
            try:
                await self._relay.flush(task.share_id, task.task_type.value)
            except PublishError as exc:
                raise TransientError(f"result stored, events not confirmed: {exc}",
                                     reason="event_publish_failed") from exc

    def _find_parked(self, task: Task, digest: str, ctx: TaskContext,
                     raw: bytes | None) -> Parked | None:
        """The parked entry was read together with the lock (one round trip)."""
        if self._parking is None:
            return None
        parked = self._parking.parse(task.task_type.value, task.share_id, digest, raw)
        if parked is None:
            return None
        # forceRecompute asks for a fresh run: only its own earlier attempt counts as fresh
        if task.payload.options.force_recompute and parked.message_id != ctx.message_id:
            return None
        return parked

    async def _park(self, task: Task, digest: str, result: HandlerResult, elapsed_ms: int,
                    ctx: TaskContext) -> None:
        if self._parking is None:
            return
        if await self._parking.park(task.task_type.value, task.share_id, digest, result,
                                    elapsed_ms, message_id=ctx.message_id):
            ctx.log.warning("task.result_parked", why="the result could not be stored")

    async def _unpark(self, task: Task) -> None:
        if self._parking is not None:
            await self._parking.drop(task.task_type.value, task.share_id)

    async def _persist(self, task: Task, result: HandlerResult, digest: str, elapsed_ms: int,
                       reservation: int | None, message_id: str | None, fence: int,
                       watching: list[Workflow]) -> list[outbox.OutboxMessage]:
        """Store the result, its costs and its outbox rows in one transaction; returns the
        outbox rows to publish once it committed. ``FenceRefused`` when the stored row's
        fencing token is not lower than ``fence`` (nothing written). A connection that
        breaks is retried with backoff for ``persist_retry_s``; the first attempt runs
        outside tenacity, whose set-up costs ~25 µs a delivery (``make bench``)."""
        def once() -> Awaitable[list[outbox.OutboxMessage]]:
            return self._persist_once(task, result, digest, elapsed_ms, reservation,
                                      message_id, fence, watching)

        async with unavailable_is_transient("persisting the result"):
            try:
                return await once()
            except PERSIST_RETRYABLE as exc:
                log.warning("result.persist_retrying", error=repr(exc))
            async for attempt in AsyncRetrying(
                    retry=retry_if_exception_type(PERSIST_RETRYABLE),
                    wait=wait_exponential(multiplier=0.2, max=5),
                    stop=stop_after_delay(self._settings.persist_retry_s), reraise=True):
                with attempt:
                    return await once()
        raise AssertionError("unreachable: tenacity returns or re-raises")

    async def _persist_once(self, task: Task, result: HandlerResult, digest: str,
                            elapsed_ms: int, reservation: int | None, message_id: str | None,
                            fence: int, watching: list[Workflow]
                            ) -> list[outbox.OutboxMessage]:
        if self._relay is not None and not watching:
            # the common case (paid or not): one statement for the batch, group-committed
            # with concurrent deliveries' results
            exchange, key, event_id, body = new_completed(
                task, result, self._events_exchange, message_id)
            return await self._saves.submit(results.EventedResult(
                task.share_id, task.task_type.value, digest, result.data,
                result.model_version, elapsed_ms, fence, exchange, key, event_id, body,
                tuple(result.costs), task.metadata.correlation_id, reservation))
        return await self._persist_in_transaction(task, result, digest, elapsed_ms,
                                                  reservation, message_id, fence, watching)

    async def _check_batch(self, keys: list[tuple[str, str]]) -> list[str | None]:
        if len(keys) == 1:
            return [await results.stored_input_hash(self._pool, *keys[0])]
        found = await results.stored_input_hashes(self._pool, keys)
        return [found.get(k) for k in keys]

    async def _save_batch(self, items: list[results.EventedResult]
                          ) -> list[list[outbox.OutboxMessage] | FenceRefused]:
        async with self._pool.acquire() as conn:
            return await results.save_many_with_events(conn, items)

    async def _persist_in_transaction(self, task: Task, result: HandlerResult, digest: str,
                                      elapsed_ms: int, reservation: int | None,
                                      message_id: str | None, fence: int,
                                      watching: list[Workflow]
                                      ) -> list[outbox.OutboxMessage]:
        pending: list[outbox.OutboxMessage] = []
        async with self._pool.acquire() as conn, conn.transaction():
            await results.save(conn, task, result, input_hash=digest, processing_ms=elapsed_ms,
                               correlation_id=task.metadata.correlation_id,
                               reservation_id=reservation, fence=fence)
            if self._relay is not None:
                assert self._env is not None
                for workflow in watching:
                    await workflow.on_result(conn, task, result, self._env)
                pending = await add_completed(conn, task, result, self._events_exchange,
                                              message_id)
        return pending

    async def _publish(self, pending: list[outbox.OutboxMessage]) -> None:
        """The outbox rows of a just-committed result, without reading them back."""
        if self._relay is None or not pending:
            return
        async with unavailable_is_transient("publishing result events"):
            try:
                await self._relay.publish(pending)
            except PublishError as exc:
                raise TransientError(f"result stored, events not confirmed: {exc}",
                                     reason="event_publish_failed") from exc

    async def _release_quietly(self, reservation: int | None) -> None:
        try:
            await self._budget.release(reservation)
        except Exception as exc:  # the reservation ages out of its window; spend errs low
            log.warning("budget.release_failed", reservation=reservation, error=repr(exc))

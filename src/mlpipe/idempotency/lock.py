"""A Redis lock per ``(taskType, shareId)``: the concurrent-duplicate guard.

The lock stops two workers from running the same task at the same time; the stored result in
Postgres stops the same task from running again later; the unique key on ``ml_results`` is the
last line behind both. The old design's "clear stale locks at start-up" is unsafe once several
replicas run (one replica's start-up would free another's live lock), so instead:

* the value is an owner token (host, pid, a uuid4 and an optional caller tag), set with
  ``SET key token NX PX ttl``: a lock frees itself when its holder dies, no sweeping needed;
* the holder renews the TTL (compare-and-``PEXPIRE``, Lua) every third of it while it works,
  so a lock outlives a slow run but not a dead worker. Two missed renewals are survivable;
  a renewal that finds someone else's token (or none) means the lock is gone, and the holder
  is told through ``Lease.lost_event`` so it can stop rather than race the new holder;
* Redis being unreachable during a renewal is *unknown*, not lost: the lease keeps retrying and
  only declares itself lost once a whole TTL has passed since the last confirmed renewal, when
  the key has certainly expired whatever happened on the server;
* release is compare-and-delete (Lua), so a worker whose lock already expired and was taken
  over can never free the new holder's lock. It runs even when the body raises or its task is
  cancelled (SIGTERM), and a Redis outage at that point is only logged: the TTL frees the lock;
* a lock can be lost without its holder knowing in time (an event loop stalled past the TTL, a
  takeover noticed only at the next renewal), so every lease carries a **fencing token**
  (``Lease.fence``), higher than that of any lease handed out before it, and whatever the
  holder writes carries the token: the store refuses a write whose token is lower than the
  one it already holds (``store/results.py``). The token is taken in the same script, and so
  the same round trip, as the ``SET NX``: ``max(last token + 1, Redis TIME in µs)``, kept in
  one counter key per prefix. The clock floor keeps tokens rising when Redis restarts without
  the counter (no persistence, or the last second of an ``everysec`` AOF lost), which would
  otherwise hand out tokens the store refuses for good; only a lost counter *and* a server
  clock set back can break the order;
* where the holder awaits, ``Lease.cancel_on_loss`` stops the guarded block as soon as the
  loss is noticed, instead of letting it spend more money on work that is no longer its own.

Acquires and releases of concurrent deliveries travel together: while one pipeline of them is
in flight the next calls gather, and go as one pipeline (``mlpipe.batching.GroupCommit``, no
timer: a lone call goes at once). Each call keeps its own reply or error; the scripts make
every call atomic on its own, so sharing a round trip changes nothing of the semantics above.

The caller chooses the TTL (the task type's expected runtime x 1.5): long enough that a few
missed renewals do not drop a live lock, short enough that a crashed worker's lock frees soon.
The token ends in the caller's tag (mlpipe uses the input hash) so a contender can tell a
duplicate of the same input from a different input without another key.
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

import redis.asyncio as aioredis
import redis.exceptions
import structlog
from redis.commands.core import AsyncScript

from mlpipe.batching import GroupCommit
from mlpipe.errors import Deferred, TransientError

log = structlog.get_logger(__name__)

#: SET NX PX, then the fencing token (and the optional peek key) in the same call.
#: KEYS: lock, fence counter[, peek]; ARGV: owner token, TTL in ms. Returns false when the
#: lock is held, else {token[, peeked value]}. Lua numbers are doubles, exact up to 2^53:
#: microseconds since 1970 fit until the year 2255.
_ACQUIRE = """
if not redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return false end
local now = redis.call('time')
local fence = math.max(tonumber(now[1]) * 1000000 + tonumber(now[2]),
                       tonumber(redis.call('get', KEYS[2]) or '0') + 1)
redis.call('set', KEYS[2], string.format('%.0f', fence))
if KEYS[3] then return {fence, redis.call('get', KEYS[3])} end
return {fence}
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""
#: Everything that means "Redis did not answer usefully": connection refused or reset, socket
#: timeouts (``redis.exceptions.TimeoutError``, and the builtin one, an ``OSError``, from our own
#: deadlines), and server-side refusals such as ``LOADING`` or ``READONLY`` during a failover.
_UNAVAILABLE = (redis.exceptions.RedisError, OSError)
#: Upper bound on waiting for a release: past it the TTL is the cheaper way to free the lock,
#: and a hung Redis must not eat the shutdown grace period.
_RELEASE_TIMEOUT_S = 5.0
#: Most lock calls one pipeline carries.
PIPELINE_MAX = 128
#: One script call: the script, its keys, its arguments.
_Call = tuple[AsyncScript, tuple[str, ...], tuple[Any, ...]]


class LockLost(Deferred):
    """The lease was lost while a block guarded by ``Lease.cancel_on_loss`` ran, and the block
    was cancelled. Whoever holds the lock now (if anyone) owns the work: the delivery waits and
    comes back, when the lock and the stored-result check tell what is left to do."""

    reason = "lock_lost"


class LockManager:
    """Hands out leases on task locks. Holds the client and the three scripts, registered
    once here so each call is an ``EVALSHA`` (loaded again after a Redis restart), and the
    pipeline that concurrent acquires and releases share."""

    def __init__(self, client: aioredis.Redis, *, prefix: str = "mlpipe:") -> None:
        self._redis = client
        self._prefix = prefix
        self._fence_key = f"{prefix}fence"
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._renew = client.register_script(_RENEW)
        self._calls: GroupCommit[_Call, Any] = GroupCommit(self._pipeline,
                                                            max_items=PIPELINE_MAX,
                                                            concurrency=2)

    async def _call(self, script: AsyncScript, keys: tuple[str, ...],
                    args: tuple[Any, ...]) -> Any:
        """Run ``script`` in the next shared pipeline; its own reply, or its own error."""
        return await self._calls.submit((script, keys, args))

    async def _pipeline(self, calls: list[_Call]) -> list[Any]:
        """One round trip for a batch of script calls. A connection error fails them all
        (each caller maps it as before); a script Redis forgot (a restart, ``SCRIPT FLUSH``)
        is loaded and its calls sent again. A batch of one is a plain call, which costs less
        than a pipeline of one (and reloads a forgotten script by itself)."""
        if len(calls) == 1:
            script, keys, args = calls[0]
            return [await script(keys=list(keys), args=list(args))]
        replies = await self._send(calls)
        missing = [i for i, r in enumerate(replies)
                   if isinstance(r, redis.exceptions.NoScriptError)]
        if missing:
            for script in {calls[i][0] for i in missing}:
                await self._redis.script_load(script.script)
            for i, reply in zip(missing, await self._send([calls[i] for i in missing]),
                                strict=True):
                replies[i] = reply
        return replies

    async def _send(self, calls: list[_Call]) -> list[Any]:
        pipe = self._redis.pipeline(transaction=False)
        for script, keys, args in calls:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        return list(await pipe.execute(raise_on_error=False))

    def key(self, task_type: str, share_id: str) -> str:
        return f"{self._prefix}lock:{task_type}:{share_id}"

    async def acquire(self, task_type: str, share_id: str, *, ttl_s: float,
                      tag: str = "", peek: str | None = None) -> Lease | None:
        """Take the lock with a fresh fencing token, or return None when someone else holds
        it. A Redis outage is a ``TransientError``: the delivery is retried later rather than
        run unguarded. The lease is not renewed until it is entered with ``async with``.
        ``peek`` names a key the caller wants read in the same round trip (``Lease.peeked``)."""
        if not ttl_s > 0:
            raise ValueError(f"lock TTL must be positive, got {ttl_s}")
        key = self.key(task_type, share_id)
        token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}:{tag}"
        ttl_ms = max(1, math.ceil(ttl_s * 1000))
        keys = (key, self._fence_key) if peek is None else (key, self._fence_key, peek)
        try:
            reply = await self._call(self._acquire, keys, (token, ttl_ms))
        except _UNAVAILABLE as exc:
            # If the SET did land before the connection broke, nobody owns it: the TTL frees it.
            raise TransientError(f"Redis unavailable taking lock {key}: {exc}",
                                 reason="redis_unavailable") from exc
        if not reply:
            return None
        lease = Lease(self, key, token, ttl_ms / 1000, fence=int(reply[0]),
                      confirmed_at=asyncio.get_running_loop().time())
        if len(reply) > 1:
            lease.peeked = reply[1]
        return lease

    async def holder(self, task_type: str, share_id: str) -> str | None:
        """The token of whoever holds the lock now, or None."""
        try:
            value = await self._redis.get(self.key(task_type, share_id))
        except _UNAVAILABLE as exc:
            raise TransientError(f"Redis unavailable: {exc}", reason="redis_unavailable") from exc
        return value.decode() if isinstance(value, bytes) else value


class Lease:
    """A held lock. ``async with lease:`` renews it in the background and releases it on exit,
    even when the body raises or is cancelled. A lease is entered at most once."""

    def __init__(self, manager: LockManager, key: str, token: str, ttl_s: float, *,
                 confirmed_at: float, fence: int = 0) -> None:
        self._m = manager
        self.key = key
        self.token = token
        self.ttl_s = ttl_s
        #: The fencing token: higher than that of every lease handed out before this one.
        self.fence = fence
        #: Set once the lock is gone (taken over, deleted, or unrenewed for a whole TTL).
        self.lost_event = asyncio.Event()
        #: Called (synchronously) when the loss is noticed: ``cancel_on_loss`` listens here.
        self._lost_listeners: list[Callable[[], None]] = []
        # Loop time at which Redis last confirmed our TTL; the key cannot outlive it by more
        # than one TTL, which is what makes "lost after an outage" a certainty, not a guess.
        self._confirmed_at = confirmed_at
        self._renewer: asyncio.Task[None] | None = None
        # The renewer starts when the first renewal is due (a third of the TTL in): most
        # runs end before that and never need a task of their own (``make bench``).
        self._renew_timer: asyncio.TimerHandle | None = None
        self._entered = False
        #: Set on exit, before the renewer is cancelled: the renewer also stops on it, since
        #: a cancellation that lands as its renewal's own deadline expires is turned into a
        #: ``TimeoutError`` by ``asyncio.timeout`` (Python 3.11) and would be taken for a
        #: failed renewal, leaving the exit waiting for a renewer that never ends.
        self._closing = False
        #: The value of ``acquire``'s ``peek`` key, read with the lock.
        self.peeked: bytes | None = None

    @property
    def lost(self) -> bool:
        return self.lost_event.is_set()

    def cancel_on_loss(self, *, retry_in_s: float) -> CancelOnLoss:
        """``with lease.cancel_on_loss(retry_in_s=...):`` inside a task: when the lease is lost
        while the block runs, cancel the block and raise ``LockLost`` (a ``Deferred`` of
        ``retry_in_s``) where it was. Like ``asyncio.timeout``: a cancellation from elsewhere
        (shutdown) stays a ``CancelledError``, and a block that swallows the cancellation and
        returns is left to the fencing token. Entering after the loss raises at once."""
        return CancelOnLoss(self, retry_in_s)

    async def __aenter__(self) -> Self:
        if self._entered:
            raise RuntimeError(f"lease on {self.key} entered twice")
        self._entered = True
        self._renew_timer = asyncio.get_running_loop().call_at(
            self._confirmed_at + self.ttl_s / 3, self._start_renewer)
        return self

    def _start_renewer(self) -> None:
        self._renew_timer = None
        self._renewer = asyncio.create_task(self._renew_loop(), name=f"lock-renew:{self.key}")

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        # Both steps run to completion even if we are cancelled meanwhile (a second SIGTERM,
        # a timeout around the whole delivery): a lock left behind blocks the task for a TTL.
        interrupted = False
        self._closing = True
        if self._renew_timer is not None:
            self._renew_timer.cancel()
            self._renew_timer = None
        if self._renewer is not None:
            self._renewer.cancel()
            interrupted |= await _finish(self._renewer)
            self._renewer = None
        if not interrupted:
            try:
                await self._release_quietly()
                return
            except asyncio.CancelledError:
                pass  # cut short: released again below, in a task a cancellation cannot stop
        releasing = asyncio.create_task(self._release_quietly(), name=f"lock-release:{self.key}")
        await _finish(releasing)
        raise asyncio.CancelledError

    async def release(self) -> bool:
        """Delete the lock if it is still ours; True when it was. For a lease that is never
        entered; ``async with`` releases by itself."""
        try:
            async with asyncio.timeout(min(_RELEASE_TIMEOUT_S, max(self.ttl_s, 0.5))):
                deleted = await self._m._call(self._m._release, (self.key,), (self.token,))
        except _UNAVAILABLE as exc:
            raise TransientError(f"Redis unavailable releasing lock {self.key}: {exc}",
                                 reason="redis_unavailable") from exc
        return bool(deleted)

    async def _release_quietly(self) -> None:
        try:
            if not await self.release():
                log.info("lock.already_gone", key=self.key)
        except TransientError as exc:  # the TTL frees it; never mask the body's own outcome
            log.warning("lock.release_failed", key=self.key, error=repr(exc.__cause__))
        except Exception:
            log.exception("lock.release_failed", key=self.key)

    async def _renew_loop(self) -> None:
        try:
            await self._renew_until_lost()
        except Exception as exc:  # a bug here must not leave the holder believing it is safe
            log.exception("lock.renewer_crashed", key=self.key)
            self._mark_lost(f"renewer crashed: {exc!r}")

    async def _renew_until_lost(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.ttl_s / 3
        ttl_ms = max(1, math.ceil(self.ttl_s * 1000))
        next_at = self._confirmed_at + interval
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            if self._closing:
                return
            expires_by = self._confirmed_at + self.ttl_s
            try:
                # A renewal still unanswered when the key has surely expired is pointless.
                async with asyncio.timeout_at(expires_by):
                    ok = await self._m._renew(keys=[self.key], args=[self.token, ttl_ms])
            except _UNAVAILABLE as exc:
                if self._closing:  # see ``_closing``: the lease is being released
                    return
                now = loop.time()
                if now >= expires_by:
                    self._mark_lost(f"no renewal for a whole TTL: {exc!r}")
                    return
                log.warning("lock.renew_failed", key=self.key, error=repr(exc),
                            expires_in_s=round(expires_by - now, 3))
                next_at = min(now + interval, expires_by)
                continue
            if not ok:
                self._mark_lost("taken over or expired")
                return
            self._confirmed_at = loop.time()
            next_at = self._confirmed_at + interval

    def _mark_lost(self, why: str) -> None:
        log.warning("lock.lost", key=self.key, why=why, fence=self.fence)
        self.lost_event.set()
        for listener in list(self._lost_listeners):
            listener()


class CancelOnLoss:
    """The context manager of ``Lease.cancel_on_loss``."""

    __slots__ = ("_cancelling", "_fired", "_lease", "_retry_in_s", "_task")

    def __init__(self, lease: Lease, retry_in_s: float) -> None:
        self._lease = lease
        self._retry_in_s = retry_in_s
        self._fired = False

    def __enter__(self) -> CancelOnLoss:
        if self._lease.lost:
            raise self._lock_lost("before the guarded block started")
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("cancel_on_loss() must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self._lease._lost_listeners.append(self._fire)
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._lease._lost_listeners.remove(self._fire)
        if (self._fired and self._task.uncancel() <= self._cancelling
                and et is asyncio.CancelledError):
            raise self._lock_lost("while the guarded block ran; it was cancelled") from e

    def _fire(self) -> None:
        self._fired = True
        self._task.cancel()

    def _lock_lost(self, when: str) -> LockLost:
        return LockLost(f"lock {self._lease.key} (fence {self._lease.fence}) lost {when}",
                        delay_s=self._retry_in_s)


#: The name the design notes use for a held task lock.
TaskLock = Lease


async def _finish(task: asyncio.Task[None]) -> bool:
    """Wait for ``task`` to end even through cancellation of the waiter (the task itself is
    not cancelled, unlike a plain ``await``); True when the waiter was cancelled meanwhile,
    so the caller can re-raise once its cleanup is done."""
    interrupted = False
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            interrupted = True
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("lock.task_failed", task=task.get_name(), error=repr(exc))
    return interrupted

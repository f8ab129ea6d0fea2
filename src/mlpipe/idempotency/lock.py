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
  cancelled (SIGTERM), and a Redis outage at that point is only logged: the TTL frees the lock.

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
from types import TracebackType
from typing import Self

import redis.asyncio as aioredis
import redis.exceptions
import structlog

from mlpipe.errors import TransientError

log = structlog.get_logger(__name__)

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


class LockManager:
    """Hands out leases on task locks. Holds only the client and the two scripts, registered
    once here so each call is an ``EVALSHA`` (redis-py reloads them after a Redis restart)."""

    def __init__(self, client: aioredis.Redis, *, prefix: str = "mlpipe:") -> None:
        self._redis = client
        self._prefix = prefix
        self._release = client.register_script(_RELEASE)
        self._renew = client.register_script(_RENEW)

    def key(self, task_type: str, share_id: str) -> str:
        return f"{self._prefix}lock:{task_type}:{share_id}"

    async def acquire(self, task_type: str, share_id: str, *, ttl_s: float,
                      tag: str = "", peek: str | None = None) -> Lease | None:
        """Take the lock, or return None when someone else holds it. A Redis outage is a
        ``TransientError``: the delivery is retried later rather than run unguarded. The
        lease is not renewed until it is entered with ``async with``. ``peek`` names a key
        the caller wants read in the same round trip (``Lease.peeked``)."""
        if not ttl_s > 0:
            raise ValueError(f"lock TTL must be positive, got {ttl_s}")
        key = self.key(task_type, share_id)
        token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}:{tag}"
        ttl_ms = max(1, math.ceil(ttl_s * 1000))
        peeked: bytes | None = None
        try:
            if peek is None:
                ok = await self._redis.set(key, token, nx=True, px=ttl_ms)
            else:
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.set(key, token, nx=True, px=ttl_ms)
                    pipe.get(peek)
                    ok, peeked = await pipe.execute()
        except _UNAVAILABLE as exc:
            # If the SET did land before the connection broke, nobody owns it: the TTL frees it.
            raise TransientError(f"Redis unavailable taking lock {key}: {exc}",
                                 reason="redis_unavailable") from exc
        if not ok:
            return None
        lease = Lease(self, key, token, ttl_ms / 1000,
                      confirmed_at=asyncio.get_running_loop().time())
        lease.peeked = peeked
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
                 confirmed_at: float) -> None:
        self._m = manager
        self.key = key
        self.token = token
        self.ttl_s = ttl_s
        #: Set once the lock is gone (taken over, deleted, or unrenewed for a whole TTL).
        self.lost_event = asyncio.Event()
        # Loop time at which Redis last confirmed our TTL; the key cannot outlive it by more
        # than one TTL, which is what makes "lost after an outage" a certainty, not a guess.
        self._confirmed_at = confirmed_at
        self._renewer: asyncio.Task[None] | None = None
        self._entered = False
        #: The value of ``acquire``'s ``peek`` key, read with the lock.
        self.peeked: bytes | None = None

    @property
    def lost(self) -> bool:
        return self.lost_event.is_set()

    async def __aenter__(self) -> Self:
        if self._entered:
            raise RuntimeError(f"lease on {self.key} entered twice")
        self._entered = True
        self._renewer = asyncio.create_task(self._renew_loop(), name=f"lock-renew:{self.key}")
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        # Both steps run to completion even if we are cancelled meanwhile (a second SIGTERM,
        # a timeout around the whole delivery): a lock left behind blocks the task for a TTL.
        interrupted = False
        if self._renewer is not None:
            self._renewer.cancel()
            interrupted |= await _finish(self._renewer)
            self._renewer = None
        releasing = asyncio.create_task(self._release_quietly(), name=f"lock-release:{self.key}")
        interrupted |= await _finish(releasing)
        if interrupted:
            raise asyncio.CancelledError

    async def release(self) -> bool:
        """Delete the lock if it is still ours; True when it was. For a lease that is never
        entered; ``async with`` releases by itself."""
        try:
            async with asyncio.timeout(min(_RELEASE_TIMEOUT_S, max(self.ttl_s, 0.5))):
                deleted = await self._m._release(keys=[self.key], args=[self.token])
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
            expires_by = self._confirmed_at + self.ttl_s
            try:
                # A renewal still unanswered when the key has surely expired is pointless.
                async with asyncio.timeout_at(expires_by):
                    ok = await self._m._renew(keys=[self.key], args=[self.token, ttl_ms])
            except _UNAVAILABLE as exc:
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
        log.warning("lock.lost", key=self.key, why=why)
        self.lost_event.set()


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

"""The Redis lock against the real Redis (outages are simulated with a proxy we can cut)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from mlpipe.errors import Deferred, TransientError
from mlpipe.idempotency import Lease, LockLost, LockManager
from mlpipe.testing import wait_for
from tests.conftest import REDIS_URL


class CuttableProxy:
    """A TCP proxy in front of the real Redis. ``cut()`` drops every connection and refuses new
    ones until ``restore()``: an outage without touching the server other tests share."""

    def __init__(self, upstream: str = "127.0.0.1", upstream_port: int = 6379) -> None:
        self._upstream = (upstream, upstream_port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[object]] = set()
        self.down = False
        #: Connections refused while down: proof that a client tried during the outage.
        self.refused = 0
        #: Added latency per chunk, and how many chunks are being held back by it right now.
        self.delay_s = 0.0
        self.in_flight = 0
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        self.down = True
        for writer in list(self._writers):
            writer.close()

    def restore(self) -> None:
        self.down = False

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        # Not cancelled: start_server's callback would log their CancelledError. Cutting closed
        # every socket, so they are already on their way out.
        if self._handlers:
            await asyncio.wait(set(self._handlers))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        up_writer: asyncio.StreamWriter | None = None
        try:
            if self.down:
                self.refused += 1
                return
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
            self._writers.add(up_writer)
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    self._writers.discard(w)
                    w.close()
                    with contextlib.suppress(OSError):
                        await w.wait_closed()
            self._handlers.discard(task)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                if self.delay_s:
                    self.in_flight += 1
                    try:
                        await asyncio.sleep(self.delay_s)
                    finally:
                        self.in_flight -= 1
                dst.write(data)
                await dst.drain()
        dst.close()


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
async def raw() -> AsyncIterator[aioredis.Redis]:
    """A direct client, to play the other worker or an operator behind the lock's back."""
    # socket timeouts as the daemon's client has (effects/__init__.py): a command stuck on a
    # connection whose earlier command was cancelled must fail, not hang the test
    client = aioredis.Redis.from_url(REDIS_URL, socket_timeout=5.0, socket_connect_timeout=5.0)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def locks(raw: aioredis.Redis, lock_prefix: str) -> LockManager:
    return LockManager(raw, prefix=lock_prefix)


@pytest.fixture
async def proxy() -> AsyncIterator[CuttableProxy]:
    p = CuttableProxy()
    await p.start()
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture
async def proxied_locks(proxy: CuttableProxy, lock_prefix: str) -> AsyncIterator[LockManager]:
    """Locks through the proxy. redis-py retries once, at once: enough to swap a connection the
    cut killed for a fresh attempt (which the proxy counts), too little to hide an outage from
    the lease's own retry logic, which is what these tests are about."""
    client = aioredis.Redis(host="127.0.0.1", port=proxy.port, retry=Retry(NoBackoff(), 1),
                            socket_timeout=1, socket_connect_timeout=1)
    try:
        yield LockManager(client, prefix=lock_prefix)
    finally:
        await client.aclose()


async def _free(locks: LockManager, share: str) -> bool:
    return await locks.holder("t", share) is None


# --- 1. exclusion ------------------------------------------------------------------------------


async def test_exclusive_until_released(locks: LockManager, raw: aioredis.Redis,
                                        lock_prefix: str) -> None:
    lease = await locks.acquire("t", "s", ttl_s=5, tag="abc")
    assert lease is not None
    assert lease.key == f"{lock_prefix}lock:t:s"
    assert lease.token.endswith(":abc")
    assert 0 < await raw.pttl(lease.key) <= 5000
    assert await locks.acquire("t", "s", ttl_s=5) is None
    async with lease:
        assert await locks.holder("t", "s") == lease.token
        assert await locks.acquire("t", "s", ttl_s=5) is None
    assert await locks.holder("t", "s") is None
    again = await locks.acquire("t", "s", ttl_s=5)
    assert again is not None
    assert again.token != lease.token
    assert await again.release()


async def test_other_keys_are_independent(locks: LockManager) -> None:
    a = await locks.acquire("transcribe", "s1", ttl_s=5)
    b = await locks.acquire("summarize", "s1", ttl_s=5)
    c = await locks.acquire("transcribe", "s2", ttl_s=5)
    leases = [lease for lease in (a, b, c) if lease is not None]
    assert len(leases) == 3
    for lease in leases:
        assert await lease.release()


async def test_a_lease_is_entered_once(locks: LockManager) -> None:
    lease = await locks.acquire("t", "s", ttl_s=5)
    assert lease is not None
    async with lease:
        pass
    with pytest.raises(RuntimeError, match="entered twice"):
        async with lease:
            pass


async def test_ttl_must_be_positive(locks: LockManager) -> None:
    with pytest.raises(ValueError, match="positive"):
        await locks.acquire("t", "s", ttl_s=0)


# --- 2. ownership ------------------------------------------------------------------------------


async def test_release_never_frees_another_owners_lock(locks: LockManager,
                                                       raw: aioredis.Redis) -> None:
    lease = await locks.acquire("t", "s", ttl_s=5)
    assert lease is not None
    async with lease:
        await raw.set(lease.key, "someone-else", px=5000)  # ours expired and was taken over
    assert await locks.holder("t", "s") == "someone-else"
    assert not await lease.release()
    assert await locks.holder("t", "s") == "someone-else"


async def test_renewal_never_extends_another_owners_lock(locks: LockManager,
                                                         raw: aioredis.Redis) -> None:
    lease = await locks.acquire("t", "s", ttl_s=0.3)
    assert lease is not None
    async with lease:
        await raw.set(lease.key, "someone-else", px=10_000)
        await asyncio.wait_for(lease.lost_event.wait(), timeout=1)
        assert await raw.pttl(lease.key) <= 10_000  # not re-PEXPIREd to our 300 ms either way
        assert await raw.pttl(lease.key) > 1000
    assert await locks.holder("t", "s") == "someone-else"


# --- 3./4. renewal and loss --------------------------------------------------------------------


async def test_renewal_keeps_a_short_lock_alive(locks: LockManager) -> None:
    # a TTL of one second (renewed every third of it) rides out the scheduling delays of a
    # loaded 2-core machine; 0.3 s flaked there
    lease = await locks.acquire("t", "s", ttl_s=1.0)
    assert lease is not None
    loop = asyncio.get_running_loop()
    async with lease:
        end = loop.time() + 3.0  # three TTLs of body time
        while loop.time() < end:
            assert await locks.holder("t", "s") == lease.token
            assert not lease.lost
            await asyncio.sleep(0.05)
    assert not lease.lost
    assert await locks.holder("t", "s") is None


async def test_exit_ends_a_renewer_whose_cancellation_became_a_timeout(
        locks: LockManager, monkeypatch: pytest.MonkeyPatch) -> None:
    """A renewal whose deadline expires as the lease exits cancels the renewer: Python 3.11's
    ``asyncio.timeout`` then raises ``TimeoutError`` instead of ``CancelledError``. The exit
    must still end the renewer (a CI run hung here for two minutes), and release the lock."""
    started = asyncio.Event()

    async def renewal_that_swallows_the_cancel(*, keys: object, args: object) -> int:
        if started.is_set():
            return 1  # later renewals succeed, as Redis answers them
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            raise TimeoutError("the renewal's deadline and the exit's cancel at once") from None
        return 1

    lease = await locks.acquire("t", "swallowed", ttl_s=0.6)
    assert lease is not None
    monkeypatch.setattr(locks, "_renew", renewal_that_swallows_the_cancel)

    async def hold() -> None:
        async with lease:
            await started.wait()

    holder = asyncio.create_task(hold())
    done, _ = await asyncio.wait({holder}, timeout=10)
    assert done, "the lease's exit waited on its renewer"
    await holder
    assert not lease.lost
    assert await _free(locks, "swallowed")


async def test_lost_lock_is_noticed_within_a_ttl(locks: LockManager, raw: aioredis.Redis) -> None:
    ttl = 1.0
    lease = await locks.acquire("t", "s", ttl_s=ttl)
    assert lease is not None
    async with lease:
        await raw.delete(lease.key)
        await asyncio.wait_for(lease.lost_event.wait(), timeout=ttl)
        assert lease.lost


async def test_renewal_rides_out_a_short_outage(proxy: CuttableProxy, proxied_locks: LockManager,
                                                locks: LockManager) -> None:
    # renewals every second: the outage costs one, the next one must succeed (a shorter TTL
    # flaked on a loaded 2-core machine, where a renewal can be late by a few hundred ms)
    ttl = 3.0
    lease = await proxied_locks.acquire("t", "s", ttl_s=ttl)
    assert lease is not None
    loop = asyncio.get_running_loop()
    async with lease:
        proxy.cut()
        await wait_for(lambda: proxy.refused > 0, timeout=ttl, message="a renewal during outage")
        proxy.restore()
        end = loop.time() + 2 * ttl
        while loop.time() < end:
            assert await locks.holder("t", "s") == lease.token
            await asyncio.sleep(0.05)
        assert not lease.lost
    assert await locks.holder("t", "s") is None


async def test_outage_declares_loss_only_once_the_key_has_surely_expired(
        proxy: CuttableProxy, proxied_locks: LockManager, locks: LockManager) -> None:
    ttl = 0.6
    loop = asyncio.get_running_loop()
    before = loop.time()
    lease = await proxied_locks.acquire("t", "s", ttl_s=ttl)
    assert lease is not None
    after = loop.time()

    async def body() -> None:
        async with lease:
            proxy.cut()
            await asyncio.wait_for(lease.lost_event.wait(), timeout=ttl + 1)
            lost_at = loop.time()
            assert lost_at - before >= ttl, "declared lost while the key could still be alive"
            assert lost_at - after <= ttl + 1.0  # promptly, with slack for a loaded machine
            assert await locks.holder("t", "s") is None  # and indeed it is gone
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):  # the body's error survives the failed release
        await body()


# --- 5. contention -----------------------------------------------------------------------------


async def test_one_of_fifty_concurrent_acquirers_wins(raw: aioredis.Redis,
                                                      lock_prefix: str) -> None:
    managers = [LockManager(raw, prefix=lock_prefix) for _ in range(50)]
    leases = await asyncio.gather(*(m.acquire("t", "hot", ttl_s=5) for m in managers))
    winners = [lease for lease in leases if lease is not None]
    assert len(winners) == 1
    assert await managers[0].holder("t", "hot") == winners[0].token
    assert await winners[0].release()


async def test_concurrent_calls_share_a_pipeline_each_with_its_own_reply(
        locks: LockManager) -> None:
    """Acquires and releases of concurrent deliveries go to Redis together; each still gets
    its own answer: one lease per share however many ask, each with its own fencing token."""
    shares = [f"p{i}" for i in range(20)]
    leases = await asyncio.gather(*(locks.acquire("t", s, ttl_s=5) for s in shares * 3))
    won = [lease for lease in leases if lease is not None]
    assert sorted(lease.key.rsplit(":", 1)[1] for lease in won) == sorted(shares)
    assert len({lease.fence for lease in won}) == len(won)
    assert max(locks._calls.batch_sizes) > 1  # they did travel together
    assert all(await asyncio.gather(*(lease.release() for lease in won)))
    assert all([await _free(locks, s) for s in shares])


async def test_scripts_redis_forgot_are_loaded_again(locks: LockManager,
                                                     raw: aioredis.Redis) -> None:
    """A Redis restart (or ``SCRIPT FLUSH``) forgets the scripts: the pipeline loads them
    again and the calls succeed, together or alone."""
    await raw.script_flush()
    leases = await asyncio.gather(*(locks.acquire("t", f"f{i}", ttl_s=5) for i in range(5)))
    assert all(lease is not None for lease in leases)
    await raw.script_flush()
    assert all(await asyncio.gather(*(lease.release() for lease in leases if lease)))
    # a pipeline of several (not only a call alone) finds the scripts gone and reloads them
    await raw.script_flush()
    replies = await locks._pipeline([(locks._acquire, (locks.key("t", f"g{i}"), locks._fence_key),
                                      (f"token-{i}", 5000)) for i in range(3)])
    assert [len(r) for r in replies] == [1, 1, 1]  # each {fence}: all three taken
    assert [await raw.get(locks.key("t", f"g{i}")) for i in range(3)] == [
        f"token-{i}".encode() for i in range(3)]


# --- 6. release on failure and cancellation ----------------------------------------------------


async def test_released_when_body_raises(locks: LockManager) -> None:
    lease = await locks.acquire("t", "a", ttl_s=5)
    assert lease is not None
    with pytest.raises(RuntimeError, match="handler failed"):
        async with lease:
            raise RuntimeError("handler failed")
    assert await locks.holder("t", "a") is None


async def _hold_forever(locks: LockManager, share: str, entered: asyncio.Event) -> None:
    lease = await locks.acquire("t", share, ttl_s=5)
    assert lease is not None
    async with lease:
        entered.set()
        await asyncio.Event().wait()


async def test_released_when_task_is_cancelled(locks: LockManager) -> None:
    entered = asyncio.Event()
    task = asyncio.create_task(_hold_forever(locks, "b", entered))
    await entered.wait()
    assert not await _free(locks, "b")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _free(locks, "b")  # freed before the cancellation reached us


async def test_released_despite_repeated_cancellation(locks: LockManager) -> None:
    """A second cancel landing during the release (a second SIGTERM) must not skip it."""
    for attempt in range(10):
        entered = asyncio.Event()
        task = asyncio.create_task(_hold_forever(locks, f"c{attempt}", entered))
        await entered.wait()
        for _ in range(attempt + 1):  # cancels at varying points of __aexit__
            task.cancel()
            await asyncio.sleep(0)
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await _free(locks, f"c{attempt}")


async def test_cancel_during_release_waits_for_it_then_propagates(
        proxy: CuttableProxy, proxied_locks: LockManager, locks: LockManager) -> None:
    """The body finished normally and the release is on the wire when the cancel lands: the
    release still completes, and the cancellation is not swallowed."""
    lease = await proxied_locks.acquire("t", "e", ttl_s=5)
    assert lease is not None
    entered, leave = asyncio.Event(), asyncio.Event()

    async def body() -> None:
        async with lease:
            entered.set()
            await leave.wait()

    task = asyncio.create_task(body())
    await entered.wait()
    proxy.delay_s = 0.3
    leave.set()
    await wait_for(lambda: proxy.in_flight > 0, timeout=2, message="release on the wire")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _free(locks, "e")


async def test_released_when_a_timeout_expires(locks: LockManager) -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):
            await _hold_forever(locks, "d", asyncio.Event())
    assert await _free(locks, "d")


# --- 7. Redis unreachable ----------------------------------------------------------------------


async def test_redis_down_is_transient(lock_prefix: str) -> None:
    client = aioredis.Redis(host="127.0.0.1", port=_unused_port())  # default retries (~3 s)
    try:
        with pytest.raises(TransientError) as caught:
            await LockManager(client, prefix=lock_prefix).acquire("t", "s", ttl_s=1)
        assert caught.value.reason == "redis_unavailable"
        assert isinstance(caught.value.__cause__, redis.exceptions.ConnectionError)
    finally:
        await client.aclose()


async def test_redis_down_is_transient_for_holder(lock_prefix: str) -> None:
    client = aioredis.Redis(host="127.0.0.1", port=_unused_port(), retry=Retry(NoBackoff(), 0))
    try:
        with pytest.raises(TransientError):
            await LockManager(client, prefix=lock_prefix).holder("t", "s")
    finally:
        await client.aclose()


async def test_unentered_lease_release_when_redis_down_is_transient(
        proxy: CuttableProxy, proxied_locks: LockManager) -> None:
    lease = await proxied_locks.acquire("t", "s", ttl_s=5)
    assert isinstance(lease, Lease)
    proxy.cut()
    with pytest.raises(TransientError):
        await lease.release()


# --- 8. fencing tokens -------------------------------------------------------------------------


async def test_each_lease_gets_a_higher_fencing_token(locks: LockManager, raw: aioredis.Redis,
                                                      lock_prefix: str) -> None:
    fences = []
    for key in ("s", "s", "other", "s"):  # same key again, and other keys in between
        lease = await locks.acquire("t", key, ttl_s=5)
        assert lease is not None
        fences.append(lease.fence)
        assert await lease.release()
    assert all(a < b for a, b in itertools.pairwise(fences)), fences
    contended = await locks.acquire("t", "s", ttl_s=5)
    assert contended is not None
    assert await locks.acquire("t", "s", ttl_s=5) is None  # refused: no token handed out
    assert await contended.release()
    # Redis restarted without the counter (no persistence, or the last second of AOF lost):
    # the clock floor keeps the next token above every earlier one
    assert await raw.delete(f"{lock_prefix}fence") == 1
    after_loss = await locks.acquire("t", "s", ttl_s=5)
    assert after_loss is not None
    assert after_loss.fence > contended.fence > fences[-1]
    assert await after_loss.release()


async def test_peek_is_read_with_the_lock_and_its_token(locks: LockManager,
                                                        raw: aioredis.Redis) -> None:
    await raw.set("peeked-key", b"parked", px=5000)
    try:
        lease = await locks.acquire("t", "p", ttl_s=5, peek="peeked-key")
        assert lease is not None
        assert lease.peeked == b"parked"
        assert lease.fence > 0
        assert await lease.release()
        missing = await locks.acquire("t", "p", ttl_s=5, peek="no-such-key")
        assert missing is not None
        assert missing.peeked is None
        assert missing.fence > lease.fence
        assert await missing.release()
    finally:
        await raw.delete("peeked-key")


# --- 9. a lost lease cancels the work it guards ------------------------------------------------


async def test_lost_lease_cancels_the_guarded_block(locks: LockManager,
                                                    raw: aioredis.Redis) -> None:
    lease = await locks.acquire("t", "g", ttl_s=1.0)
    assert lease is not None
    started, reached_the_end = asyncio.Event(), []

    async def guarded() -> None:
        async with lease:
            with lease.cancel_on_loss(retry_in_s=7):
                started.set()
                await asyncio.Event().wait()  # a paid call that would go on and on
                reached_the_end.append(True)

    task = asyncio.create_task(guarded())
    await started.wait()
    await raw.delete(lease.key)  # expired, or taken over
    with pytest.raises(LockLost) as caught:
        await asyncio.wait_for(task, timeout=2.0)  # noticed at the next renewal (ttl / 3)
    assert (caught.value.reason, caught.value.delay_s) == ("lock_lost", 7)
    assert isinstance(caught.value, Deferred)  # waits, without using up retries
    assert reached_the_end == []
    assert task.cancelling() == 0  # the cancellation was consumed, not left pending


async def test_cancel_on_loss_leaves_other_outcomes_alone(locks: LockManager) -> None:
    lease = await locks.acquire("t", "h", ttl_s=5)
    assert lease is not None
    async with lease:
        with lease.cancel_on_loss(retry_in_s=1):  # finishes normally
            await asyncio.sleep(0)
        entered = asyncio.Event()

        async def shut_down() -> None:
            with lease.cancel_on_loss(retry_in_s=1):
                entered.set()
                await asyncio.Event().wait()

        task = asyncio.create_task(shut_down())
        await entered.wait()
        task.cancel()  # a shutdown's cancellation, not a lost lock
        with pytest.raises(asyncio.CancelledError):
            await task
        assert lease._lost_listeners == []
    assert not lease.lost


async def test_guarding_an_already_lost_lease_raises_at_once(locks: LockManager,
                                                             raw: aioredis.Redis) -> None:
    lease = await locks.acquire("t", "i", ttl_s=1.0)
    assert lease is not None
    async with lease:
        await raw.delete(lease.key)
        await asyncio.wait_for(lease.lost_event.wait(), timeout=2.0)
        with pytest.raises(LockLost, match="before the guarded block started"), \
                lease.cancel_on_loss(retry_in_s=1):
            pytest.fail("the block must not run")

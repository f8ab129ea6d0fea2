"""One AMQP connection that owns its own recovery.

aio-pika's ``RobustConnection`` reconnects at a fixed interval and restores channels behind the
caller's back; users have reported consumers that never came back after a broker restart. Here
recovery is explicit and in one place: a supervisor task connects with jittered exponential
backoff, runs the owner's ``on_connect`` hook (declare topology, open channels, start
consumers) on every fresh connection, and tears everything down and starts again on any loss.
Callers see only ``state``, ``wait_connected()`` and the hooks; they never reconnect themselves.

The URL may name several hosts, the nodes of one cluster (``mlpipe.broker.urls``). The first
connection goes to a node chosen at random, so that a fleet of workers and producers spreads
over the cluster instead of piling onto the first node listed. Every later attempt starts at
the host after the last one tried: the node that just died (or refused) is the one not to
retry first, and each node is tried once before any is tried twice. One *attempt*, for the
backoff, ``failed_attempts`` and a producer's circuit breaker, is one round over all hosts:
a dead node costs a refused connect, not a backoff step, and "the broker is unreachable"
still means every node of it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import AbstractConnection

from mlpipe.broker.urls import BrokerHost, BrokerUrl
from mlpipe.errors import MlpipeError, TopologyMismatch

log = structlog.get_logger(__name__)

ConnectHook = Callable[[AbstractConnection], Awaitable[None]]
DisconnectHook = Callable[[BaseException | None], Awaitable[None] | None]

#: Longest one host may take to accept a connection (TCP, TLS, AMQP handshake) before the
#: next host is tried.
CONNECT_TIMEOUT_S = 10.0


class State(enum.StrEnum):
    IDLE = "idle"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    CLOSED = "closed"


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with "equal jitter": half the step is fixed, half random, so a
    fleet reconnecting after a broker restart spreads out but never hammers it."""

    base_s: float = 0.5
    max_s: float = 30.0

    def delay(self, attempt: int) -> float:
        step: float = min(self.max_s, self.base_s * 2.0 ** min(attempt, 32))
        return step / 2 + random.uniform(0, step / 2)


class BrokerConnection:
    """Supervises one connection.

    :param url: AMQP URL (the vhost is part of it), with one host or several
        (``amqp://u:p@h1:5672,h2:5672,h3:5672/vhost``); ``ValueError`` if it is malformed.
    :param name: shown in the broker's connection list (``connection_name``).
    :param on_connect: awaited on every fresh connection; if it raises, the connection is
        dropped and retried like any other failure.
    :param on_disconnect: called when an established connection is lost.
    :param backoff: reconnect delays.
    :param setup_timeout_s: longest ``on_connect`` may take before the connection is dropped
        and retried.
    """

    def __init__(
        self,
        url: str,
        *,
        name: str,
        on_connect: ConnectHook | None = None,
        on_disconnect: DisconnectHook | None = None,
        backoff: Backoff = Backoff(),
        setup_timeout_s: float = 30.0,
    ) -> None:
        self._hosts = BrokerUrl.parse(url).hosts
        #: Index of the next host to try: random at first, then the one after the last tried.
        self._cursor = random.randrange(len(self._hosts))
        self._name = name
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._backoff = backoff
        self._setup_timeout = setup_timeout_s
        self._conn: AbstractConnection | None = None
        self._connected = asyncio.Event()
        self._lost = asyncio.Event()
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None
        self.state = State.IDLE
        #: Consecutive failed attempts since the last successful connect.
        self.failed_attempts = 0
        #: Successful connects after the first one.
        self.reconnects = 0
        self.last_error: str | None = None
        self.connected_since: float | None = None
        #: ``host:port`` of the node the current connection goes to.
        self.host: str | None = None
        self._ever_connected = False
        #: An error reconnecting cannot cure (a topology mismatch): raised to waiters.
        self.fatal: MlpipeError | None = None

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self, *, wait: bool = True, timeout: float | None = None) -> None:
        """Start supervising; with ``wait``, return once the first connect (and its hook)
        succeeded, raising ``TimeoutError`` after ``timeout``."""
        if self._supervisor is None:
            self._supervisor = asyncio.create_task(self._supervise(), name=f"amqp:{self._name}")
        if wait:
            await self.wait_connected(timeout)

    async def close(self) -> None:
        """Stop reconnecting and close the connection. Idempotent."""
        self._closing = True
        self._lost.set()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        await self._drop()
        self.state = State.CLOSED

    async def wait_connected(self, timeout: float | None = None) -> AbstractConnection:
        if self._closing:
            raise RuntimeError(f"connection {self._name} is closed")
        async with asyncio.timeout(timeout):
            while True:
                await self._connected.wait()
                if self.fatal is not None:
                    raise self.fatal
                if self._conn is not None and not self._conn.is_closed:
                    return self._conn
                await asyncio.sleep(0.01)  # lost but not yet noticed by the supervisor

    def request_reconnect(self, reason: str) -> None:
        """Drop the current connection (for instance after a channel was closed by the broker)
        so the supervisor rebuilds everything from scratch."""
        if self._conn is not None and not self._closing:
            log.warning("amqp.reconnect_requested", connection=self._name, reason=reason)
            self._lost.set()

    @property
    def connection(self) -> AbstractConnection | None:
        return self._conn if self.state is State.CONNECTED else None

    @property
    def is_connected(self) -> bool:
        return self.state is State.CONNECTED

    # --- the supervisor --------------------------------------------------------------------

    async def _supervise(self) -> None:
        while not self._closing:
            self.state = State.CONNECTING
            try:
                await self._connect_once()
            except asyncio.CancelledError:
                raise
            except TopologyMismatch as exc:
                log.error("amqp.fatal", connection=self._name, error=str(exc))
                self.fatal = exc
                self.state = State.CLOSED
                await self._drop()
                self._connected.set()  # wake waiters so they raise
                return
            except Exception as exc:
                self.failed_attempts += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                delay = self._backoff.delay(self.failed_attempts - 1)
                log.warning("amqp.connect_failed", connection=self._name,
                            attempt=self.failed_attempts, error=self.last_error,
                            retry_in_s=round(delay, 2))
                await self._drop()
                await asyncio.sleep(delay)
                continue

            await self._lost.wait()
            error, lost_host = self.last_error, self.host
            self._connected.clear()
            await self._drop()
            if self._closing:
                return
            self.state = State.CONNECTING
            log.warning("amqp.connection_lost", connection=self._name, host=lost_host,
                        error=error)
            await self._notify_disconnect(error)
            # A first retry soon after a loss, then the usual backoff if the broker is away.
            await asyncio.sleep(self._backoff.delay(0))

    async def _connect_once(self) -> None:
        self._lost.clear()
        conn, host = await self._open()
        self._conn = conn
        self.host = host.address
        conn.close_callbacks.add(self._on_close)
        if self._on_connect is not None:
            await self._run_hook(conn, self._on_connect)
        if conn.is_closed or self._lost.is_set():
            raise ConnectionError("connection closed during set-up")
        if self._ever_connected:
            self.reconnects += 1
        self._ever_connected = True
        self.failed_attempts = 0
        self.last_error = None
        self.connected_since = time.monotonic()
        self.state = State.CONNECTED
        self._connected.set()
        log.info("amqp.connected", connection=self._name, host=self.host,
                 reconnects=self.reconnects)

    async def _open(self) -> tuple[AbstractConnection, BrokerHost]:
        """One round over the hosts from the cursor on; the cursor ends after the host that
        accepted (or where it started, if none did)."""
        conn, index = await _open_first(self._hosts, self._cursor, self._name)
        self._cursor = (index + 1) % len(self._hosts)
        return conn, self._hosts[index]

    async def _run_hook(self, conn: AbstractConnection, hook: ConnectHook) -> None:
        """Run the set-up hook, but never longer than the connection lives or than
        ``setup_timeout_s``: an RPC (declare, qos, consume) on a connection that dies under it
        can stay pending, and a supervisor stuck here would never reconnect."""
        setup = asyncio.ensure_future(hook(conn))
        lost = asyncio.ensure_future(self._lost.wait())
        try:
            done, _ = await asyncio.wait({setup, lost}, timeout=self._setup_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            setup.cancel()
            raise
        finally:
            lost.cancel()
        if setup in done:
            setup.result()  # the hook's own error, if any
            return
        setup.cancel()
        with contextlib.suppress(BaseException):
            await setup
        if self._lost.is_set():
            raise ConnectionError("connection lost during set-up")
        raise TimeoutError(f"connection set-up took longer than {self._setup_timeout}s")

    def _on_close(self, _sender: Any, exc: BaseException | None = None) -> None:
        if exc is not None:
            self.last_error = f"{type(exc).__name__}: {exc}"
        self._lost.set()

    async def _notify_disconnect(self, error: str | None) -> None:
        if self._on_disconnect is None:
            return
        try:
            res = self._on_disconnect(ConnectionError(error) if error else None)
            if res is not None:
                await res
        except Exception:
            log.exception("amqp.on_disconnect_failed", connection=self._name)

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        self.connected_since = None
        self.host = None
        if conn is None:
            return
        with contextlib.suppress(Exception):
            conn.close_callbacks.discard(self._on_close)
        if not conn.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), timeout=5)


async def connect_any(url: str, *, name: str) -> AbstractConnection:
    """A plain connection, not supervised, for a short-lived command (``mlpipe dlq``): the
    first of ``url``'s hosts, tried from a random one on, that accepts."""
    hosts = BrokerUrl.parse(url).hosts
    conn, _ = await _open_first(hosts, random.randrange(len(hosts)), name)
    return conn


async def _open_first(hosts: tuple[BrokerHost, ...], start: int,
                      name: str) -> tuple[AbstractConnection, int]:
    """Try each host once, from ``start`` on; return the first connection and its index. With
    one host its own error is raised; with several, one naming every host's."""
    errors: list[str] = []
    for step in range(len(hosts)):
        index = (start + step) % len(hosts)
        host = hosts[index]
        try:
            conn = await aio_pika.connect(host.url, timeout=CONNECT_TIMEOUT_S,
                                          client_properties={"connection_name": name})
        except Exception as exc:
            if len(hosts) == 1:
                raise
            errors.append(f"{host.address}: {type(exc).__name__}: {exc}")
            log.warning("amqp.host_unreachable", connection=name, host=host.address,
                        error=errors[-1])
            continue
        return conn, index
    raise ConnectionError(f"no broker host reachable ({'; '.join(errors)})")

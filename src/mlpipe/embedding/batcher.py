"""Micro-batching across deliveries: many concurrent handler runs, one backend call.

An embedding call costs about the same for one text as for dozens (a GPU/CPU forward pass, an
HTTP round trip), while the embed queue delivers many small tasks at once (prefetch 256). So
each handler run hands its texts to the shared ``Batcher`` and awaits its own vectors; the
batcher gathers requests per model until ``max_batch`` texts are waiting or the oldest has
waited ``max_wait_s``, makes one call, and gives every caller its slice (and its share of the
billed tokens, by estimated size). While every call slot is busy, due requests keep gathering
instead of queueing up as many small calls, so batches grow with load.

Each delivery is still locked, persisted and acked on its own by the daemon; only the backend
call is shared. Failures are shared too: when the call fails, every caller in the batch gets a
``TransientError`` of its own (same reason, chained to the cause) and is retried by the daemon.
A ``PermanentError`` (the API rejected the request) is not trusted for the whole batch, since
one bad input must not dead-letter its neighbours: the batch is re-run request by request so
only the culprit fails permanently.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import structlog

from mlpipe.errors import PermanentError, TransientError

from .backend import BatchOutput, EmbedBackend, Vector, approx_tokens

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Embedded:
    """One caller's answer: a vector per text, in order, and its share of billed tokens."""

    vectors: list[Vector]
    tokens: int | None


@dataclass(frozen=True)
class BatcherStats:
    #: Backend calls made (what batching saves).
    batches: int
    #: Texts sent to the backend.
    texts: int
    #: ``submit``/``embed`` calls answered or failed.
    requests: int
    failed_batches: int
    largest_batch: int
    #: Seconds spent inside backend calls (how busy the model or the API kept this batcher).
    backend_s: float = 0.0


@dataclass(eq=False)
class _Request:
    texts: list[str]
    future: asyncio.Future[Embedded]
    #: Estimated tokens, to split the billed total among callers.
    weight: int


@dataclass(eq=False)
class _Bucket:
    deadline: float
    requests: list[_Request] = field(default_factory=list)
    size: int = 0


class Batcher:
    """An async context manager owning one background task (the wait-deadline timer) and the
    tasks of the calls in flight; leaving it answers what is still pending, waits for the calls
    and closes the backend."""

    def __init__(self, backend: EmbedBackend, *, max_batch: int, max_wait_s: float,
                 max_concurrent_calls: int = 1, name: str = "embed") -> None:
        if max_batch < 1 or max_concurrent_calls < 1 or max_wait_s < 0:
            raise ValueError("need max_batch >= 1, max_concurrent_calls >= 1, max_wait_s >= 0")
        self.backend = backend
        self.name = name
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._max_calls = max_concurrent_calls
        self._slots = asyncio.Semaphore(max_concurrent_calls)
        self._pending: dict[str, _Bucket] = {}
        self._wakeup = asyncio.Event()
        self._calls: set[asyncio.Task[None]] = set()
        self._in_flight = 0
        self._timer: asyncio.Task[None] | None = None
        self._closing = False
        self._batches = self._texts = self._requests = self._failed = self._largest = 0
        self._backend_s = 0.0
        #: Told the size of every backend call (the daemon's batch-size histogram).
        self.on_batch: Callable[[int], None] | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._timer = asyncio.create_task(self._run_timer(), name=f"mlpipe.{self.name}.timer")
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._closing:
            return
        self._closing = True
        try:
            for model in list(self._pending):  # nobody may be left waiting on a closed batcher
                self._dispatch(model, self._pending.pop(model).requests)
            if self._calls:
                await asyncio.wait(set(self._calls))
        finally:
            try:
                if self._timer is not None:
                    self._timer.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await self._timer
            finally:
                await self.backend.aclose()

    def stats(self) -> BatcherStats:
        return BatcherStats(self._batches, self._texts, self._requests, self._failed,
                            self._largest, self._backend_s)

    # --- callers ------------------------------------------------------------------------------

    async def embed(self, texts: Sequence[str], *, model: str | None = None) -> list[Vector]:
        """One vector per text, computed in a batch shared with concurrent callers."""
        return (await self.submit(texts, model=model)).vectors

    async def submit(self, texts: Sequence[str], *, model: str | None = None) -> Embedded:
        """Like ``embed``, plus this request's share of the tokens the provider billed."""
        if self._closing or self._timer is None or self._timer.done():
            raise TransientError(f"{self.name} batcher is not running", reason="shutting_down")
        items = list(texts)
        if not items:
            return Embedded([], None)
        key = model or self.backend.default_model
        future: asyncio.Future[Embedded] = asyncio.get_running_loop().create_future()
        request = _Request(items, future, max(1, sum(approx_tokens(t) for t in items)))
        self._requests += 1
        bucket = self._pending.get(key)
        if bucket is not None and bucket.size + len(items) > self._max_batch:
            self._dispatch(key, self._pending.pop(key).requests)
            bucket = None
        if bucket is None:
            bucket = _Bucket(asyncio.get_running_loop().time() + self._max_wait_s)
            self._pending[key] = bucket
            self._wakeup.set()
        bucket.requests.append(request)
        bucket.size += len(items)
        if bucket.size >= self._max_batch:  # full: waiting longer gains nothing
            self._dispatch(key, self._pending.pop(key).requests)
        return await future  # a cancelled caller cancels its future; the batch skips it

    # --- batching -----------------------------------------------------------------------------

    async def _run_timer(self) -> None:
        """Dispatch buckets whose wait is over, as call slots allow."""
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending and self._in_flight < self._max_calls:
                now = loop.time()
                for model in [m for m, b in self._pending.items() if b.deadline <= now]:
                    if self._in_flight >= self._max_calls:
                        break
                    self._dispatch(model, self._pending.pop(model).requests)
                if not self._pending or self._in_flight >= self._max_calls:
                    break  # a finishing call or a new bucket sets the event again
                nearest = min(b.deadline for b in self._pending.values())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(nearest):
                        await self._wakeup.wait()
                self._wakeup.clear()

    def _dispatch(self, model: str, requests: list[_Request]) -> None:
        self._in_flight += 1
        task = asyncio.create_task(self._batch(model, requests),
                                   name=f"mlpipe.{self.name}.call")
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def _batch(self, model: str, requests: list[_Request]) -> None:
        try:
            await self._serve(model, requests)
        except asyncio.CancelledError:
            _fail(requests, TransientError(f"{self.name} batcher stopped mid-call",
                                           reason="shutting_down"))
            raise
        finally:
            self._in_flight -= 1
            self._wakeup.set()

    async def _serve(self, model: str, requests: list[_Request]) -> None:
        live = [r for r in requests if not r.future.done()]
        if not live:
            return
        try:
            async with self._slots:
                output = await self._call(model, [t for r in live for t in r.texts])
        except PermanentError as exc:
            if len(live) == 1:
                live[0].future.set_exception(exc)
                return
            log.warning("embed.batch_rejected_isolating", batcher=self.name, model=model,
                        requests=len(live), error=str(exc)[:300])
            for request in live:
                await self._serve(model, [request])
            return
        except Exception as exc:
            log.warning("embed.batch_failed", batcher=self.name, model=model,
                        requests=len(live), error_class=type(exc).__name__,
                        error=str(exc)[:300])
            _fail(live, exc)
            return
        at = 0
        for request, tokens in zip(live, _split(output.tokens, [r.weight for r in live]),
                                   strict=True):
            n = len(request.texts)
            if not request.future.done():
                request.future.set_result(Embedded(output.vectors[at:at + n], tokens))
            at += n

    async def _call(self, model: str, texts: list[str]) -> BatchOutput:
        """The backend call; only a single request larger than a batch needs several."""
        vectors: list[Vector] = []
        tokens: int | None = 0
        for at in range(0, len(texts), self._max_batch):
            part = texts[at:at + self._max_batch]
            self._batches += 1
            self._texts += len(part)
            self._largest = max(self._largest, len(part))
            if self.on_batch is not None:
                self.on_batch(len(part))
            started = time.perf_counter()
            try:
                out = await self.backend(part, model)
                if len(out.vectors) != len(part):
                    raise TransientError(f"{self.name} backend returned {len(out.vectors)} "
                                         f"vectors for {len(part)} texts",
                                         reason="embed_bad_response")
            except BaseException:
                self._failed += 1
                raise
            finally:
                self._backend_s += time.perf_counter() - started
            vectors.extend(out.vectors)
            tokens = None if tokens is None or out.tokens is None else tokens + out.tokens
        log.debug("embed.batch", batcher=self.name, model=model, texts=len(texts))
        return BatchOutput(vectors, tokens)


def _transient(exc: Exception) -> TransientError:
    """The error each caller of a failed batch gets: its own instance (several tasks raising
    one exception object would tangle their tracebacks), same reason, chained to the cause."""
    if isinstance(exc, TransientError):
        err = TransientError(str(exc), reason=exc.reason, delay_s=exc.delay_s)
    else:
        err = TransientError(f"embedding batch failed: {type(exc).__name__}: {exc}",
                             reason="embed_batch_failed")
    err.__cause__ = exc
    return err


def _fail(requests: list[_Request], exc: Exception) -> None:
    for request in requests:
        if not request.future.done():
            request.future.set_exception(_transient(exc))


def _split(total: int | None, weights: list[int]) -> list[int | None]:
    """``total`` apportioned by ``weights`` (largest remainder), summing to ``total`` exactly."""
    if total is None:
        return [None] * len(weights)
    whole = sum(weights)
    raw = [total * w / whole for w in weights]
    shares = [int(r) for r in raw]
    by_remainder = sorted(range(len(raw)), key=lambda n: raw[n] - shares[n], reverse=True)
    for n in by_remainder[:total - sum(shares)]:
        shares[n] += 1
    return list(shares)

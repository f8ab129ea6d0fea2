"""A/B of the daemon's micro-optimisations on the no-op consume row (issue 16).

Issue 16 keeps each micro-optimisation only if it buys at least 5 % on a ``make bench`` row.
The row it was written for is workload 1, no-op consume (``bench.consume_noop.mlpipe_noop``:
the real ``Daemon`` with ``DirectExecutor`` and a handler that returns at once, on uvloop,
against a quorum queue pre-filled with contract messages). On a shared machine wall-clock
throughput moves with the other processes, so this script measures what hardly does:

* **client CPU µs per message**: CPU time (user + system) of the consuming process over the
  same window as the bench (first handler start to the n-th settle), divided by n, as row 1'
  does. Every round runs each variant once, order rotating, each in a fresh process (so a
  variant's monkeypatches and structlog's cached loggers cannot leak into another's); the
  figure is the median of the rounds.
* **instructions per message** (``--callgrind``): the same consuming process under
  ``valgrind --tool=callgrind``, for two message counts; the difference of the two totals
  divided by the difference of the counts is the per-message cost, free of start-up and
  shutdown, and of the machine's load.

Variants (the product is never edited: a variant applies a temporary monkeypatch in the
consuming process, before the daemon is built):

* ``current``: the code as it is;
* ``plain_timeout``: ``run_handler`` under ``asyncio.timeout`` instead of
  ``worker.timeouts.limit`` (the shared timer);
* ``plain_delivery``: the consumer subscribes with aio-pika's ``queue.consume`` and gets
  aio-pika's ``IncomingMessage`` (whose ``ack`` waits for the write) instead of aiormq's
  ``basic_consume`` and the lazy ``Delivery`` (whose ack does not wait);
* ``plain_logs``: structlog's processors (``merge_contextvars``, ``add_log_level``,
  ``TimeStamper``, ``format_exc_info``) and ``JSONRenderer`` to a ``PrintLogger`` instead of
  ``logs.Prepare`` + the pydantic-core ``JsonRenderer`` to a ``BytesLogger``;
* ``plain_flush``: structlog's ``BytesLogger`` (a write and flush per line) instead of
  ``logs.LoopFlushedLogger`` (one flush per event-loop pass);
* ``all_plain``: the timer, delivery and renderer variants together (structlog's chain writes
  a line at a time, so it has no flush per pass either);
* ``before`` (with ``--before REF``): the product as it was at a git ref, from a temporary
  worktree, unpatched (issue 16: "no slower on any row than before the change").

A variant whose optimisation is already gone from the product is the same as ``current``
(its patch is skipped, and said so).

Logging is configured as ``bench.run`` does it (JSON at INFO into /dev/null), so the daemon
pays for its ``task.done`` line per delivery as in production.

Usage::

    python -m bench.micro_ab                       # 7 rounds x 4,000 messages, CPU µs/msg
    python -m bench.micro_ab --rounds 9 --n 6000 --variants current,plain_logs
    python -m bench.micro_ab --callgrind           # instructions/msg, 200 and 1,200 messages
    python -m bench.micro_ab --components          # each optimised step alone, µs per call

``--components`` times what each of ``plain_timeout`` and ``plain_logs`` changes, alone and
in one process (no broker): ``run_handler`` on a no-op handler on uvloop, and the
``task.done`` line with the seven fields the daemon binds, rendered into /dev/null; blocks of
calls alternate between the two versions, and the figure is the median CPU time per call.
Instruction counts weigh instructions alike, which favours neither version only when both
run the same kind of code: ``json.dumps`` scans strings in tight, cheap loops, so the log
renderer's share is worth timing too.

Results that decided issue 16 (2-core shared machine, load average 3-14; CPU µs/msg medians
of interleaved rounds of 4,000 messages, plain vs current; instructions per message as
``(I(1200) - I(200)) / 1000``, two runs; the gain is plain / current - 1):

================  ==============================  ====================  ==================
optimisation      CPU µs/msg (3 runs; paired       instructions/msg      alone (--components)
                  median over all rounds)
================  ==============================  ====================  ==================
timeouts.limit    +15.9 %, +8.1 %, -5.1 %; +2.6 %  +2.8 %, +3.4 %        2.9 µs/msg
Delivery          +19.7 %, +55.1 %; +43.8 %        +33.3 %, +33.6 %      -
log renderer      -1.0 %, -1.7 %, -1.2 %; +1.7 %   +7.5 %, +7.7 %        4.0 µs/msg
================  ==============================  ====================  ==================

``Delivery`` stayed; the shared timer and the log renderer went (commits 904cedd, cf56e2f);
the renderer came back later (119497b, +11 % in a same-run A/B on the row).

"No slower than before the change" (``--before bf41479``, the last commit before issue 16's
work; 2026-12-04, load 1-2): after 62c9133 (one flush of the log lines per event-loop pass,
span attributes built only when a span records, a shared ``Ack``, ``Processed`` a
``NamedTuple``, no context reset), instructions per no-op message 694k before, 687k now
(0.990x; 1.035x without those changes), client CPU 188 -> 184 µs/msg (0.978x, medians of 9
rounds); the flush per pass alone (``plain_flush``) is worth +9.0 % of CPU per message.
Instructions count user space only: a message's CPU time also holds the kernel's socket and
epoll work and memory stalls, so the log line (cheap, tight loops) weighs 11 % of the
instructions but 3-5 % of the time; the row is throughput per CPU time.

It needs RabbitMQ (``BENCH_BROKER_HOST``, default 127.0.0.1:5672, guest/guest) and
``rabbitmqctl``: it works in a throwaway vhost, deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

VARIANTS = ("current", "plain_timeout", "plain_delivery", "plain_logs", "plain_flush",
            "all_plain")
#: The product as it was at ``--before REF`` (a git worktree), unpatched.
BEFORE = "before"

#: What each optimisation's gain is read against: its plain variant vs ``current``.
OPTIMISATIONS = {"timeouts.limit": "plain_timeout", "Delivery": "plain_delivery",
                 "log renderer": "plain_logs", "flush per pass": "plain_flush",
                 "all": "all_plain"}


# --- the plain versions (what the product had before each optimisation) -----------------------


def _patch_timeout() -> str:
    """``run_handler`` as it was before ``worker/timeouts.py``: ``asyncio.timeout``."""
    import mlpipe.execution as execution

    if not hasattr(execution, "limit"):
        return "plain_timeout: run_handler has no limit() any more; nothing to patch"
    from mlpipe.errors import HandlerTimeout
    from mlpipe.handlers import HandlerResult

    async def run_handler(task: Any, spec: Any, ctx: Any, default_timeout_s: float) -> Any:
        seconds = spec.timeout_s or default_timeout_s
        try:
            async with asyncio.timeout(seconds):
                result = await spec.func(task, ctx)
        except TimeoutError:
            raise HandlerTimeout(f"{task.task_type.value} ran longer than {seconds}s") from None
        if not isinstance(result, HandlerResult):
            raise TypeError(f"handler for {task.task_type.value} returned "
                            f"{type(result).__name__}, not HandlerResult")
        return result

    execution.run_handler = run_handler
    return "plain_timeout: run_handler under asyncio.timeout"


def _patch_delivery() -> str:
    """The consumer as aio-pika's users write it: ``queue.consume`` -> ``IncomingMessage``."""
    import structlog

    from mlpipe.worker import consumer

    if not hasattr(consumer, "Delivery"):
        return "plain_delivery: the consumer has no Delivery any more; nothing to patch"
    log = structlog.get_logger(consumer.__name__)

    async def subscribe(self: Any, channel: Any) -> None:
        await channel.set_qos(prefetch_count=self._tuning.prefetch)
        self._queue = await channel.get_queue(self.queue_name, ensure=False)
        self._accepting = True
        self._channel = None  # acks are awaited: nothing to flush
        self._tag = await self._queue.consume(self._on_message, no_ack=False)
        log.info("consumer.subscribed", queue=self.queue_name, prefetch=self._tuning.prefetch,
                 concurrency=self._tuning.concurrency)

    consumer.QueueConsumer.subscribe = subscribe  # type: ignore[method-assign]
    return "plain_delivery: queue.consume with aio-pika's IncomingMessage"


def _plain_configure(level: str = "INFO") -> None:
    """``logs.configure(json=True)`` as it was before the cheaper renderer (805cf70^)."""
    import logging

    import structlog

    renderer = structlog.processors.JSONRenderer()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.getLevelName(level))


def _configure_logging(plain: bool, flush_each: bool = False) -> str:
    """JSON at INFO into /dev/null, as ``bench.run`` does. ``flush_each``: structlog's
    ``BytesLogger`` (a write per line) instead of ``logs.LoopFlushedLogger``."""
    import structlog

    import mlpipe.logs

    sink = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    if plain and not hasattr(mlpipe.logs, "Prepare"):
        plain = False
        note = "plain_logs: logs.configure is structlog's chain already; nothing to patch"
    else:
        note = "plain_logs: structlog's processors and JSONRenderer" if plain else ""
    with contextlib.redirect_stderr(sink):
        if plain:
            _plain_configure()
        else:
            mlpipe.logs.configure(json=True, level="INFO")
            if flush_each and hasattr(mlpipe.logs, "LoopFlushedLogger"):
                structlog.configure(
                    logger_factory=structlog.BytesLoggerFactory(file=sys.stderr.buffer))
                note = "plain_flush: structlog's BytesLogger, a write per line"
            elif flush_each:
                note = "plain_flush: logs write a line at a time already; nothing to patch"
    return note


def apply(variant: str) -> list[str]:
    """Set the consuming process up as ``variant``; returns what was patched."""
    notes: list[str] = []
    everything = variant == "all_plain"
    if everything or variant == "plain_timeout":
        notes.append(_patch_timeout())
    if everything or variant == "plain_delivery":
        notes.append(_patch_delivery())
    notes.append(_configure_logging(plain=everything or variant == "plain_logs",
                                    flush_each=variant == "plain_flush"))
    return [n for n in notes if n]


# --- one consuming process --------------------------------------------------------------------


async def _consume(url: str, n: int, timeout: float) -> dict[str, float]:
    from bench.consume_noop import EMBED, mlpipe_settings, noop_registry
    from bench.measure import Completion, quiesce
    from mlpipe.execution import DirectExecutor
    from mlpipe.testing import wait_for
    from mlpipe.worker.daemon import Daemon

    handled = Completion(n)
    settings = mlpipe_settings(url)
    daemon = Daemon(settings, noop_registry(handled), [EMBED],
                    executor=DirectExecutor(settings), name="micro-ab")
    quiesce()
    await daemon.start()
    try:
        await handled.wait(timeout)
        await wait_for(lambda: daemon.status().tasks_done >= n, interval=0.0005,
                       timeout=timeout, message="all messages settled")
        from bench.measure import cpu_seconds

        cpu_end, wall_end = cpu_seconds(), time.perf_counter()
    finally:
        await daemon.stop()
    assert handled.first is not None
    assert handled.cpu_first is not None
    return {"cpu_us_per_msg": (cpu_end - handled.cpu_first) / n * 1e6,
            "seconds": wall_end - handled.first}


def _use_tree(src: str) -> str:
    """Import ``mlpipe`` from another checkout's ``src`` (the ``before`` variant). The bench's
    own modules stay this checkout's; before issue 16 ``DirectExecutor`` lived in
    ``mlpipe.worker.process``, so that module answers for ``mlpipe.execution`` there."""
    sys.path.insert(0, src)
    import importlib

    import mlpipe

    if not mlpipe.__file__ or not mlpipe.__file__.startswith(src):
        raise RuntimeError(f"mlpipe imported from {mlpipe.__file__}, not from {src}")
    try:
        importlib.import_module("mlpipe.execution")
    except ImportError:
        sys.modules["mlpipe.execution"] = importlib.import_module("mlpipe.worker.process")
    return f"before: mlpipe from {src}"


def consume_once(variant: str, url: str, n: int, timeout: float,
                 tree: str | None = None) -> None:
    """The child: apply ``variant``, consume ``n`` messages, print one JSON line."""
    if variant == BEFORE:
        if tree is None:
            raise ValueError("the before variant needs --tree")
        notes = [_use_tree(tree), *apply("current")]
    else:
        notes = apply(variant)
    import uvloop

    result = uvloop.run(_consume(url, n, timeout))
    print(json.dumps({"variant": variant, "n": n, **result, "notes": notes}), flush=True)


# --- the driver -------------------------------------------------------------------------------


async def _prefill(url: str, n: int) -> str:
    from bench.consume_noop import prepare_mlpipe_queue

    return await prepare_mlpipe_queue(url, n)


async def _drained_and_deleted(url: str, queue: str) -> None:
    from bench import broker

    left = await broker.queue_depth(url, queue)
    await broker.delete_queue(url, queue)
    if left:
        raise RuntimeError(f"{queue}: {left} messages left after the run; acks were lost")


#: The ``src`` folder of the ``--before`` worktree, once made.
_TREE: dict[str, str] = {}


def _child(variant: str, url: str, n: int, timeout: float,
           wrap: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    cmd = [*wrap, sys.executable, "-m", "bench.micro_ab", "--one", variant, "--url", url,
           "--n", str(n), "--timeout", str(timeout)]
    if variant == BEFORE:
        cmd += ["--tree", _TREE["src"]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout * 3 + 600)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


def _run_one(url: str, variant: str, n: int, timeout: float,
             wrap: Sequence[str] = ()) -> tuple[dict[str, Any], str]:
    queue = asyncio.run(_prefill(url, n))
    done = _child(variant, url, n, timeout, wrap)
    asyncio.run(_drained_and_deleted(url, queue))
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result, done.stderr


def _summary(samples: dict[str, list[float]], unit: str) -> None:
    med = {v: statistics.median(s) for v, s in samples.items() if s}
    print(f"\n{'variant':<16}{'median':>12}{'min':>12}{'max':>12}  {unit}")
    for v, s in samples.items():
        if s:
            print(f"{v:<16}{med[v]:>12.2f}{min(s):>12.2f}{max(s):>12.2f}")
    if "current" not in med:
        return
    if BEFORE in med:
        print(f"\ncurrent vs before: {med['current'] / med[BEFORE]:.3f}x the cost "
              f"({med[BEFORE]:.2f} -> {med['current']:.2f} {unit}; below 1 is cheaper now)")
    print("\ngain of each optimisation (plain cost / current cost - 1, i.e. throughput at "
          "equal CPU; 5 % keeps it):")
    for name, plain in OPTIMISATIONS.items():
        if plain in med:
            gain = med[plain] / med["current"] - 1
            print(f"  {name:<16}{gain * 100:>+7.1f} %  ({med[plain]:.2f} -> "
                  f"{med['current']:.2f} {unit})")


def cpu_ab(url: str, variants: Sequence[str], rounds: int, n: int, timeout: float) -> None:
    samples: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(rounds):
        order = list(variants[r % len(variants):]) + list(variants[:r % len(variants)])
        for variant in order:
            result, _ = _run_one(url, variant, n, timeout)
            samples[variant].append(result["cpu_us_per_msg"])
            print(f"round {r + 1} {variant:<16}{result['cpu_us_per_msg']:8.2f} µs/msg  "
                  f"{n / result['seconds']:8.0f} msg/s  load {os.getloadavg()[0]:.1f}  "
                  f"{'; '.join(result['notes'])}", flush=True)
    _summary(samples, "CPU µs/msg")


_COLLECTED = re.compile(r"Collected\s*:\s*(\d+)")


def callgrind_ab(url: str, variants: Sequence[str], counts: tuple[int, int],
                 timeout: float) -> None:
    out_dir = tempfile.mkdtemp(prefix="micro_ab_callgrind.")
    totals: dict[str, dict[int, int]] = {v: {} for v in variants}
    for n in counts:
        for variant in variants:
            out = os.path.join(out_dir, f"callgrind.{variant}.{n}")
            wrap = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
            _, stderr = _run_one(url, variant, n, timeout, wrap)
            found = _COLLECTED.findall(stderr)
            if not found:
                raise RuntimeError(f"no instruction count from callgrind:\n{stderr[-2000:]}")
            totals[variant][n] = int(found[-1])
            print(f"{variant:<16} n={n:<6} {int(found[-1]):>16,} instructions", flush=True)
    lo, hi = counts
    per = {v: [(t[hi] - t[lo]) / (hi - lo)] for v, t in totals.items()}
    print(f"\ninstructions per message = (I({hi}) - I({lo})) / {hi - lo}; profiles in {out_dir}")
    _summary(per, "instructions/msg")


# --- the changed steps alone -----------------------------------------------------------------


def _alternate(name: str, a: Callable[[], float], b: Callable[[], float], rounds: int) -> None:
    """``a`` and ``b`` return CPU µs per call of one block; run them alternately."""
    sa: list[float] = []
    sb: list[float] = []
    for r in range(rounds):
        first, second = (a, b) if r % 2 == 0 else (b, a)
        x, y = first(), second()
        if first is a:
            sa.append(x)
            sb.append(y)
        else:
            sa.append(y)
            sb.append(x)
    ma, mb = statistics.median(sa), statistics.median(sb)
    print(f"{name}: current {ma:.2f} µs/call [{min(sa):.2f}..{max(sa):.2f}], plain "
          f"{mb:.2f} µs/call [{min(sb):.2f}..{max(sb):.2f}]; plain - current = "
          f"{mb - ma:+.2f} µs per message", flush=True)


def _block(calls: int, fn: Callable[[], None]) -> float:
    t0 = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - t0) / calls * 1e6


def components(rounds: int = 21, calls: int = 20_000) -> None:
    import logging

    import structlog
    import uvloop

    import mlpipe.execution as execution
    import mlpipe.logs

    # the log line: two loggers built from each configuration's processors and sink
    sink = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    # the renderer of 805cf70..cf56e2f, when the product still has it (getattr: it is gone)
    prepare, renderer = (getattr(mlpipe.logs, "Prepare", None),
                         getattr(mlpipe.logs, "JsonRenderer", None))
    if prepare is not None and renderer is not None:
        current = structlog.wrap_logger(
            structlog.BytesLogger(open(os.devnull, "wb")),  # noqa: SIM115
            processors=[prepare(exceptions=True), renderer(as_bytes=True)],
            wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    else:
        current = None
    plain = structlog.wrap_logger(
        structlog.PrintLogger(sink),
        processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    structlog.processors.format_exc_info,
                    structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    structlog.contextvars.bind_contextvars(
        queue="ml.embed", message_id="0f3a9c2e6b1d4e8f", share_id="bench-00001234",
        task_type="embed_vectors", attempt=1, correlation_id=None, traceparent=None)
    if current is not None:
        line_c, line_p = current, plain
        _alternate("task.done line", lambda: _block(calls, lambda: line_c.info(
            "task.done", skipped=False)), lambda: _block(calls, lambda: line_p.info(
            "task.done", skipped=False)), rounds)
    else:
        print("task.done line: logs has structlog's chain already; nothing to compare")

    # the handler time limit, on uvloop as in the daemon
    from mlpipe.contract.models import TaskType, build_task
    from mlpipe.handlers import HandlerResult, HandlerSpec

    limited = execution.run_handler
    if not hasattr(execution, "limit"):
        print("run_handler: no limit() any more; nothing to compare")
        return
    _patch_timeout()
    unlimited = execution.run_handler
    ok = HandlerResult({})

    async def handle(task: Any, ctx: Any) -> HandlerResult:
        return ok

    task = build_task(TaskType.EMBED_VECTORS, "s-1", {"content": {"text": "t"}})
    spec = HandlerSpec(TaskType.EMBED_VECTORS, handle)

    async def timed(fn: Any) -> float:
        t0 = time.process_time()
        for _ in range(calls):
            await fn(task, spec, None, 900.0)
        return (time.process_time() - t0) / calls * 1e6

    async def both() -> None:
        ta: list[float] = []
        tb: list[float] = []
        for r in range(rounds):
            if r % 2 == 0:
                ta.append(await timed(limited))
                tb.append(await timed(unlimited))
            else:
                tb.append(await timed(unlimited))
                ta.append(await timed(limited))
        ma, mb = statistics.median(ta), statistics.median(tb)
        print(f"run_handler: current {ma:.2f} µs/call [{min(ta):.2f}..{max(ta):.2f}], plain "
              f"{mb:.2f} µs/call [{min(tb):.2f}..{max(tb):.2f}]; plain - current = "
              f"{mb - ma:+.2f} µs per message", flush=True)

    uvloop.run(both())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.micro_ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated, of {','.join(VARIANTS)} (and {BEFORE} with "
                             "--before); default all")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--n", type=int, default=4000, help="messages per run (CPU mode)")
    parser.add_argument("--callgrind", action="store_true",
                        help="instruction counts under valgrind instead of CPU time")
    parser.add_argument("--components", action="store_true",
                        help="time the changed steps alone (no broker)")
    parser.add_argument("--counts", default="200,1200",
                        help="the two message counts of --callgrind")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--before", metavar="REF",
                        help="also run the product as it was at this git ref (variant "
                             "'before', from a temporary worktree); default variants then "
                             "current,before")
    parser.add_argument("--one", choices=(*VARIANTS, BEFORE), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        consume_once(args.one, args.url, args.n, args.timeout, args.tree)
        return 0
    default = f"current,{BEFORE}" if args.before else ",".join(VARIANTS)
    variants = [v.strip() for v in (args.variants or default).split(",") if v.strip()]
    unknown = [v for v in variants if v not in (*VARIANTS, BEFORE)]
    if BEFORE in variants and not args.before:
        parser.error("the before variant needs --before REF")
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    if args.components:
        components()
        return 0
    from bench import broker

    run: Callable[[str], None]
    if args.callgrind:
        lo, hi = (int(c) for c in args.counts.split(","))
        def run(url: str) -> None:
            callgrind_ab(url, variants, (lo, hi), args.timeout)
    else:
        def run(url: str) -> None:
            cpu_ab(url, variants, args.rounds, args.n, args.timeout)
    with contextlib.ExitStack() as stack:
        if args.before:
            _TREE["src"] = os.path.join(stack.enter_context(_worktree(args.before)), "src")
        url = stack.enter_context(broker.vhost("micro-ab"))
        run(url)
    return 0


@contextlib.contextmanager
def _worktree(ref: str) -> Any:
    """A detached git worktree of ``ref`` in a temporary folder, removed afterwards."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = tempfile.mkdtemp(prefix="micro_ab_before.")
    subprocess.run(["git", "-C", root, "worktree", "add", "--detach", "--force", path, ref],
                   check=True, capture_output=True, text=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", root, "worktree", "remove", "--force", path],
                       capture_output=True, text=True)


if __name__ == "__main__":
    sys.exit(main())

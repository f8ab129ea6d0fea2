"""``python -m bench.run [--quick]``: every workload against its baselines, in one run.

Prints the table (medians with the min..max of the rounds, ratios of medians, the targets of
issue 17 with PASS/FAIL judged on medians), writes the figures to
``bench/results/<timestamp>.json`` and ``bench/results/latest.json``, and draws the ratios to
``bench/results/latest.png`` (``bench.chart``). Contenders of a workload run in interleaved
rounds (the order rotates each round) and each figure is the median of its rounds, so that a
burst of load from another process on the machine moves one sample, not the comparison.
Exit status: 0 when everything was measured, 1 when a contender failed (its figure is
missing, never invented), 2 with ``--strict`` when a target failed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import broker, messages
from bench.measure import Run
from bench.report import Figure, Report, check_all, figure, missing, render

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
INSTALL_HINT = "pip install -e '.[bench]'"


@dataclass(frozen=True)
class Plan:
    """How much of each workload one run does."""

    rounds: int
    noop_n: int
    celery_n: int
    full_n: int
    #: Celery's full path is ~10x slower: fewer tasks give the same steady-state window.
    celery_full_n: int
    publish_serial_n: int
    publish_in_flight_n: int
    in_flight: int
    latency_rate: float
    latency_s: float
    latency_rounds: int
    embed_n: int
    embed_rounds: int
    embed_api_n: int
    memory_counts: tuple[int, int]


FULL = Plan(rounds=5, noop_n=10_000, celery_n=5_000, full_n=4_000, celery_full_n=1_000,
            publish_serial_n=1_000, publish_in_flight_n=10_000, in_flight=256, latency_rate=500,
            latency_s=6, latency_rounds=3, embed_n=400, embed_rounds=3, embed_api_n=600,
            memory_counts=(10_000, 20_000))
QUICK = Plan(rounds=1, noop_n=2_000, celery_n=1_000, full_n=800, celery_full_n=300,
             publish_serial_n=300, publish_in_flight_n=2_000, in_flight=256, latency_rate=500,
             latency_s=3, latency_rounds=1, embed_n=100, embed_rounds=1, embed_api_n=100,
             memory_counts=(1_000, 2_000))

Sample = Callable[[], Awaitable[float]]


class Bench:
    """Collects figures, errors and timings of one run."""

    def __init__(self, plan: Plan, quick: bool, dsn: str, api_latency_ms: float) -> None:
        self.plan = plan
        self.quick = quick
        self.dsn = dsn
        self.api_latency_ms = api_latency_ms
        self.figures: list[Figure] = []
        self.errors: dict[str, str] = {}
        self.notes: dict[str, str] = {}
        self.durations: dict[str, float] = {}

    async def rounds(self, workload: str, unit: str, contenders: Mapping[str, Sample], *,
                     rounds: int | None = None, higher_is_better: bool = True) -> None:
        """Run each contender ``rounds`` times, interleaved, order rotating; record every
        round (the figure is their median). A contender that fails is dropped from later
        rounds and reported with its error: its figure is missing, not made of fewer rounds."""
        names = list(contenders)
        samples: dict[str, list[float]] = {n: [] for n in names}
        failed: dict[str, str] = {}
        for r in range(rounds or self.plan.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                if name in failed:
                    continue
                try:
                    value = await contenders[name]()
                except Exception as exc:
                    failed[name] = _why(exc)
                    self.errors[f"{workload}/{name}"] = failed[name]
                    print(f"  {workload}/{name}: FAILED {failed[name]}", file=sys.stderr)
                    continue
                samples[name].append(value)
                print(f"  {workload}/{name} round {r + 1}: {value:,.2f} {unit}",
                      file=sys.stderr, flush=True)
        for name in names:
            if samples[name] and name not in failed:
                self.figures.append(figure(workload, name, unit, samples[name],
                                           higher_is_better=higher_is_better))
            else:
                self.figures.append(missing(workload, name, unit, failed.get(name, "no sample"),
                                            higher_is_better=higher_is_better))


def _why(exc: BaseException) -> str:
    if isinstance(exc, ModuleNotFoundError):
        return f"{exc.name} not installed: {INSTALL_HINT}"
    return f"{type(exc).__name__}: {exc}"[:300]


# --- workloads ----------------------------------------------------------------------------------


async def noop_consume(b: Bench) -> None:
    from bench.celery_bench import celery_noop
    from bench.consume_noop import faststream_noop, mlpipe_noop, raw_noop

    n, nc = b.plan.noop_n, b.plan.celery_n
    cpu: dict[str, list[float]] = {"mlpipe": [], "raw_aio_pika": [], "faststream": []}

    async def rate(name: str, run: Awaitable[Run]) -> float:
        result = await run
        if name in cpu and result.cpu_us_per_message is not None:
            cpu[name].append(result.cpu_us_per_message)
        return result.rate

    with broker.vhost("noop") as url:
        await b.rounds("noop_consume", "msg/s", {
            "mlpipe": lambda: rate("mlpipe", mlpipe_noop(url, n)),
            "raw_aio_pika": lambda: rate("raw_aio_pika", raw_noop(url, n)),
            "faststream": lambda: rate("faststream", faststream_noop(url, n)),
            "celery": lambda: rate("celery", celery_noop(url, nc)),
        })
    for name, samples in cpu.items():
        failed = f"noop_consume/{name}" in b.errors
        b.figures.append(figure("noop_cpu", name, "us/msg", samples, higher_is_better=False)
                         if samples and not failed else
                         missing("noop_cpu", name, "us/msg", "failed, see noop_consume",
                                 higher_is_better=False))


async def full_path(b: Bench) -> None:
    from bench.celery_full import celery_full
    from bench.full_path import (
        hand_written_full,
        mlpipe_full,
        raw_no_events_full,
        throwaway_schema,
    )

    n, nc = b.plan.full_n, b.plan.celery_full_n
    cpu: dict[str, list[float]] = {"mlpipe": [], "hand_written": [], "raw_no_events": []}

    async def rate(name: str, run: Awaitable[Run]) -> float:
        result = await run
        if name in cpu and result.cpu_us_per_message is not None:
            cpu[name].append(result.cpu_us_per_message)
        return result.rate

    with broker.vhost("full") as url:
        async with throwaway_schema(b.dsn, REDIS_URL) as stores:
            await b.rounds("full_path", "msg/s", {
                "mlpipe": lambda: rate("mlpipe", mlpipe_full(url, n, stores)),
                "hand_written": lambda: rate("hand_written", hand_written_full(url, n, stores)),
                "celery": lambda: rate("celery", celery_full(url, nc, stores)),
                "raw_no_events": lambda: rate("raw_no_events",
                                              raw_no_events_full(url, n, stores)),
            })
    for name, samples in cpu.items():
        failed = f"full_path/{name}" in b.errors
        b.figures.append(figure("full_cpu", name, "us/msg", samples, higher_is_better=False)
                         if samples and not failed else
                         missing("full_cpu", name, "us/msg", "failed, see full_path",
                                 higher_is_better=False))


async def publishing(b: Bench) -> None:
    from bench.publishing import mlpipe_publish, raw_publish

    p = b.plan
    with broker.vhost("publish") as url:
        await b.rounds("publish_serial", "msg/s", {
            "mlpipe": lambda: _rate(mlpipe_publish(url, p.publish_serial_n, 1)),
            "raw_aio_pika": lambda: _rate(raw_publish(url, p.publish_serial_n, 1)),
        })
        await b.rounds("publish_in_flight", "msg/s", {
            "mlpipe": lambda: _rate(mlpipe_publish(url, p.publish_in_flight_n, p.in_flight)),
            "raw_aio_pika": lambda: _rate(raw_publish(url, p.publish_in_flight_n,
                                                      p.in_flight)),
        })


async def latency(b: Bench) -> None:
    from bench.latency import Latency, mlpipe_latency, raw_latency

    p = b.plan
    seen: dict[str, list[Latency]] = {"mlpipe": [], "raw_aio_pika": []}

    async def run(name: str, fn: Callable[[str, float, float], Awaitable[Latency]],
                  url: str) -> float:
        result = await fn(url, p.latency_rate, p.latency_s)
        seen[name].append(result)
        return result.p99_ms

    with broker.vhost("latency") as url:
        await b.rounds("latency_p99", "ms", {
            "mlpipe": lambda: run("mlpipe", mlpipe_latency, url),
            "raw_aio_pika": lambda: run("raw_aio_pika", raw_latency, url),
        }, rounds=p.latency_rounds, higher_is_better=False)
    note = f"{p.latency_rate:g} msg/s offered for {p.latency_s:g} s"
    for name, results in seen.items():
        if results:
            b.figures.append(figure("latency_p50", name, "ms", [r.p50_ms for r in results],
                                    higher_is_better=False))
            slow = [r.achieved_rate for r in results if r.achieved_rate < 0.95 * p.latency_rate]
            if slow:
                b.notes[f"latency/{name}"] = (f"publisher reached only {min(slow):.0f} msg/s "
                                              f"of {note}")
        else:
            b.figures.append(missing("latency_p50", name, "ms", "failed, see latency_p99",
                                     higher_is_better=False))


async def embed_batching(b: Bench) -> None:
    """Workload 5: batched vs one call per message through the daemon, first with the API
    backend against the fake server with a fixed per-call latency (where batching pays), then
    with the local MiniLM on the CPU (where it saves per-call overhead only)."""
    from bench import embed_batching as module
    from bench.consume_noop import HTTP
    from bench.full_path import throwaway_schema
    from mlpipe.settings import Settings

    p = b.plan
    for workload, n, what in (("embed_api", p.embed_api_n, "api"),
                              ("embed_batching", p.embed_n, "local")):
        try:
            with broker.vhost(f"embed-{what}") as url:
                async with throwaway_schema(b.dsn, REDIS_URL) as stores:
                    settings = Settings(broker_url=url, database_url=stores.dsn,
                                        database_schema=stores.schema,
                                        redis_url=stores.redis_url,
                                        lock_prefix=f"bench:{uuid.uuid4().hex[:8]}:", **HTTP)
                    result: Any = await (
                        module.measure_api(settings, n, latency_ms=b.api_latency_ms,
                                           rounds=p.embed_rounds)
                        if what == "api" else module.measure(settings, n, rounds=p.embed_rounds))
        except Exception as exc:
            b.errors[workload] = _why(exc)
            print(f"  {workload}: FAILED {b.errors[workload]}", file=sys.stderr)
            b.figures += [missing(workload, k, "msg/s", b.errors[workload])
                          for k in ("batched", "per_message")]
            continue
        _embed_figures(b, workload, n, result)


def _embed_figures(b: Bench, workload: str, n: int, result: Mapping[str, Any]) -> None:
    latency = (f", API {result['api_latency_ms']:g} ms a call"
               if "api_latency_ms" in result else "")
    for key, theirs in (("batched", "batched"), ("per_message", "one_call_per_message")):
        samples = result.get("samples_messages_per_s", {}).get(theirs)
        if not samples:
            b.figures.append(missing(workload, key, "msg/s", f"no {theirs} samples"))
            continue
        detail = result.get(theirs, {})
        b.figures.append(figure(workload, key, "msg/s", samples,
                                note=f"{n} msgs, {detail.get('texts_per_call', '?')} "
                                     f"texts/call{latency}"))
        print(f"  {workload}/{key}: {samples} msg/s", file=sys.stderr, flush=True)
    where = "; ".join(f"{mode}: {d.get('texts_per_call', '?')} texts/call, "
                      f"{d.get('cpu_ms_per_msg', '?')} ms CPU/msg (last round)"
                      for mode in ("batched", "one_call_per_message")
                      if isinstance(d := result.get(mode), Mapping))
    server = (f"fake OpenAI-compatible server answering each call after "
              f"{result['api_latency_ms']:g} ms; " if latency else "")
    b.notes[workload] = server + where


async def memory(b: Bench) -> None:
    from bench.full_path import throwaway_schema
    from bench.memory import measure_api_memory, measure_memory, measure_model_memory

    a, c = b.plan.memory_counts
    with broker.vhost("memory") as url:
        async with throwaway_schema(b.dsn, REDIS_URL) as stores:
            m = await measure_memory(url, stores, (a, c))
            b.figures += [
                figure("memory", "idle", "MB", [m.idle_mb], note="idle, after start-up"),
                figure("memory", "after_a", "MB", [m.after_a_mb], note=f"after {a:,} tasks"),
                figure("memory", "after_b", "MB", [m.after_b_mb], note=f"after {c:,} tasks"),
            ]
    with broker.vhost("api-memory") as url:
        async with throwaway_schema(b.dsn, REDIS_URL) as stores:
            try:
                api_idle = await measure_api_memory(url, stores)
            except Exception as exc:
                b.errors["memory/api_idle"] = _why(exc)
                print(f"  memory/api_idle: FAILED {b.errors['memory/api_idle']}",
                      file=sys.stderr)
                b.figures.append(missing("memory", "api_idle", "MB",
                                         b.errors["memory/api_idle"]))
            else:
                b.figures.append(figure("memory", "api_idle", "MB", [api_idle],
                                        note="transcribe,summarize,embed, API key set"))
    with broker.vhost("models") as url:
        async with throwaway_schema(b.dsn, REDIS_URL) as stores:
            try:
                mm = await measure_model_memory(url, stores)
            except Exception as exc:
                b.errors["memory/models"] = _why(exc)
                print(f"  memory/models: FAILED {b.errors['memory/models']}", file=sys.stderr)
                b.figures += [missing("memory", k, "MB", b.errors["memory/models"])
                              for k in ("models_idle", "models_loaded")]
                return
    b.figures += [
        figure("memory", "models_idle", "MB", [mm.idle_mb],
               note="shipped handlers, idle, nothing loaded"),
        figure("memory", "models_loaded", "MB", [mm.loaded_mb],
               note="after one local embed + one local transcribe"),
    ]


WORKLOADS: dict[str, Callable[[Bench], Awaitable[None]]] = {
    "noop": noop_consume,
    "full": full_path,
    "publish": publishing,
    "latency": latency,
    "embed": embed_batching,
    "memory": memory,
}
#: Figures a whole workload owes when it fails before recording any.
_OWED: dict[str, tuple[tuple[str, str, str], ...]] = {
    "noop": tuple(("noop_consume", c, "msg/s")
                  for c in ("mlpipe", "raw_aio_pika", "faststream", "celery"))
    + tuple(("noop_cpu", c, "us/msg") for c in ("mlpipe", "raw_aio_pika", "faststream")),
    "full": tuple(("full_path", c, "msg/s")
                  for c in ("mlpipe", "hand_written", "celery", "raw_no_events"))
    + tuple(("full_cpu", c, "us/msg") for c in ("mlpipe", "hand_written", "raw_no_events")),
    "publish": tuple((w, c, "msg/s") for w in ("publish_serial", "publish_in_flight")
                     for c in ("mlpipe", "raw_aio_pika")),
    "latency": tuple((w, c, "ms") for w in ("latency_p50", "latency_p99")
                     for c in ("mlpipe", "raw_aio_pika")),
    "embed": tuple((w, c, "msg/s") for w in ("embed_api", "embed_batching")
                   for c in ("batched", "per_message")),
    "memory": tuple(("memory", c, "MB") for c in ("idle", "after_a", "after_b", "api_idle",
                                                   "models_idle", "models_loaded")),
}


async def _rate(run: Awaitable[Any]) -> float:
    return float((await run).rate)


# --- the run ------------------------------------------------------------------------------------


def pg_dsn() -> str:
    """The pgvector Postgres (started if needed, as the test suite does)."""
    script = str(ROOT / "scripts" / "pgvector-server")
    subprocess.run(["bash", script, "start"], check=True, capture_output=True, timeout=180)
    out = subprocess.run(["bash", script, "url"], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def environment() -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for dist in ("mlpipe", "aio-pika", "aiormq", "pamqp", "uvloop", "pydantic", "faststream",
                 "celery", "kombu", "celery-singleton", "psycopg", "asyncpg", "redis"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    rabbit: str | None
    try:
        rabbit = broker.rabbitmqctl("version").strip()
    except (OSError, subprocess.SubprocessError):
        rabbit = None
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                            capture_output=True, text=True).stdout.strip() or None
    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "rabbitmq": rabbit, "commit": commit,
            "load_avg_start": [round(x, 2) for x in os.getloadavg()],
            "body_bytes": messages.BODY_BYTES, "versions": versions}


def write_results(report: Report, directory: Path = RESULTS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    stamp = report.started_at.replace(":", "").replace("-", "")
    path = directory / f"{stamp}.json"
    text = json.dumps(report.to_json(), indent=2) + "\n"
    path.write_text(text)
    (directory / "latest.json").write_text(text)
    return path


def write_chart_quietly(report: Report, results: Path) -> Path | None:
    """``latest.png`` beside the results; a chart that cannot be drawn (matplotlib missing)
    is an error in the list, not a failed run: the figures are in the JSON either way."""
    try:
        from bench.chart import write_chart

        return write_chart(report.to_json(), results.parent / "latest.png")
    except Exception as exc:
        report.errors["chart"] = _why(exc)
        return None


async def run(quick: bool, only: Sequence[str], api_latency_ms: float) -> Report:
    plan = QUICK if quick else FULL
    started = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    t0 = time.monotonic()
    bench = Bench(plan, quick, pg_dsn(), api_latency_ms)
    env = environment()
    for name in only:
        print(f"== {name}", file=sys.stderr, flush=True)
        t = time.monotonic()
        before = len(bench.figures)
        try:
            await WORKLOADS[name](bench)
        except Exception as exc:
            bench.errors[name] = _why(exc)
            print(f"  {name}: FAILED {bench.errors[name]}", file=sys.stderr)
            have = {f.key for f in bench.figures[before:]}
            bench.figures += [missing(w, c, u, bench.errors[name])
                              for w, c, u in _OWED[name] if (w, c) not in have]
        bench.durations[name] = time.monotonic() - t
    env["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    return Report(started_at=started.isoformat().replace("+00:00", "Z"),
                  mode="quick" if quick else "full", seconds=time.monotonic() - t0,
                  environment=env,
                  plan={**dataclasses.asdict(plan), "api_latency_ms": api_latency_ms},
                  figures=bench.figures,
                  durations_s=bench.durations, errors=bench.errors, notes=bench.notes)


def _quiet_logging() -> None:
    """mlpipe logs as ``mlpipe consume`` does (JSON at INFO: the daemon pays for its logging
    as in production) but into /dev/null, so the table stays readable."""
    from mlpipe.logs import configure

    sink = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    with contextlib.redirect_stderr(sink):
        configure(json=True, level="INFO")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller counts, one round")
    parser.add_argument("--only", default=",".join(WORKLOADS),
                        help=f"comma-separated subset of {','.join(WORKLOADS)}")
    parser.add_argument("--strict", action="store_true", help="exit 2 when a target fails")
    parser.add_argument("--api-latency-ms", type=float, default=50.0,
                        help="the fake embeddings API's delay per call (default 50)")
    args = parser.parse_args(argv)
    only = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = [w for w in only if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; choose from {list(WORKLOADS)}")
    _quiet_logging()
    import uvloop

    report = uvloop.run(run(args.quick, only, args.api_latency_ms))
    path = write_results(report)
    chart = write_chart_quietly(report, path)
    checks = check_all(report.figures)
    env = report.environment
    title = (f"mlpipe bench ({report.mode}, {report.seconds:.0f} s, {env['cpus']} CPUs, "
             f"RabbitMQ {env['rabbitmq']}, load {env['load_avg_start'][0]} -> "
             f"{env['load_avg_end'][0]}); figures are the median (min..max) of "
             f"{report.plan['rounds']} interleaved round(s)")
    print(render(report.figures, checks, title=title))
    for key, note in report.notes.items():
        print(f"note: {key}: {note}")
    print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in report.durations_s.items())
          + f"; total {report.seconds:.0f} s")
    print(f"\nresults: {path.relative_to(ROOT)} (and bench/results/latest.json)")
    if chart is not None:
        print(f"chart: {chart.relative_to(ROOT)}")
    if report.errors:
        print("errors:\n" + "\n".join(f"  {k}: {v}" for k, v in report.errors.items()))
        return 1
    if args.strict and any(c.verdict == "FAIL" for c in checks):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

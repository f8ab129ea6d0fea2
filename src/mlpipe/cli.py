"""``mlpipe`` command line. Signals and exit codes live here and nowhere else.

Exit codes: 0 clean stop (signal or finished command), 1 error, 2 usage error,
3 worker recycled (max tasks or RSS; Kubernetes starts a fresh one), 130 forced by a second
signal.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from mlpipe.errors import MlpipeError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_RECYCLED, EXIT_FORCED = 0, 1, 2, 3, 130
DEFAULT_HANDLERS = "consumers:build_registry"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    from mlpipe.logs import configure

    configure(json=args.log_json, level=args.log_level)
    try:
        code: int = _run(args.func(args))
    except MlpipeError as exc:
        print(f"mlpipe: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except ValueError as exc:
        print(f"mlpipe: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return code


def _run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro)


def _settings(args: argparse.Namespace) -> Any:
    from mlpipe.settings import Settings

    overrides = {}
    if getattr(args, "broker_url", None):
        overrides["broker_url"] = args.broker_url
    return Settings(**overrides)


# --- consume ------------------------------------------------------------------------------------


def load_registry(spec: str, settings: Any) -> Any:
    """``module:attr`` naming a ``Registry`` or a callable ``(settings) -> Registry``."""
    from mlpipe.handlers import Registry

    module_name, _, attr = spec.partition(":")
    obj = getattr(importlib.import_module(module_name), attr or "registry")
    registry = obj if isinstance(obj, Registry) else obj(settings)
    if not isinstance(registry, Registry):
        raise ValueError(f"{spec} did not give a Registry")
    return registry


async def cmd_consume(args: argparse.Namespace) -> int:
    import structlog

    from mlpipe.broker.topology import parse_queue_names

    log = structlog.get_logger("mlpipe.cli")
    settings = _settings(args)
    queues = parse_queue_names(args.queues)
    registry = load_registry(args.handlers, settings)
    for q in queues:
        missing = [t.value for t in q.task_types if t not in registry]
        if missing:
            log.warning("consume.no_handler", queue=q.short_name, task_types=missing,
                        effect="these tasks will be dead-lettered with reason no_handler")
    from mlpipe.effects import Effects

    async with Effects(settings) as effects:
        return await _consume(settings, registry, queues, effects, log)


async def _consume(settings: Any, registry: Any, queues: Any, effects: Any, log: Any) -> int:
    from mlpipe.worker.daemon import Daemon

    daemon = Daemon(settings, registry, queues, executor=effects.executor,
                    readiness={"redis": effects.check_redis, "postgres": effects.check_postgres})
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            log.warning("consume.forced_exit", signal=sig.name)
            sys.stderr.flush()
            import os

            os._exit(EXIT_FORCED)
        daemon.request_stop(f"signal:{sig.name}")

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    reason = await daemon.run()
    return EXIT_RECYCLED if reason in ("max_tasks", "max_rss") else EXIT_OK


# --- publish ------------------------------------------------------------------------------------


def _tasks_from_file(path: Path) -> list[Any]:
    from mlpipe.contract.codec import decode
    from mlpipe.contract.models import build_task

    tasks = []
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
                if "version" in doc:
                    tasks.append(decode(line.strip()))
                else:
                    tasks.append(build_task(doc["taskType"], doc["shareId"], doc["payload"]))
            except (ValueError, KeyError, TypeError, MlpipeError) as exc:
                raise ValueError(f"{path}:{lineno}: {exc}") from None
    return tasks


async def cmd_publish(args: argparse.Namespace) -> int:
    from mlpipe.contract.models import build_task
    from mlpipe.producer import Producer

    if args.file:
        tasks = _tasks_from_file(Path(args.file))
    else:
        if not (args.task_type and args.share_id and args.payload):
            raise ValueError("give --file, or --task-type, --share-id and --payload")
        tasks = [build_task(args.task_type, args.share_id, json.loads(args.payload))]
    settings = _settings(args)
    done = failed = 0
    started = time.monotonic()
    async with Producer(settings, name="mlpipe-cli-publish") as producer:
        slots = asyncio.Semaphore(args.in_flight)

        async def one(task: Any) -> None:
            nonlocal done, failed
            async with slots:
                try:
                    receipt = await producer.publish(task)
                except MlpipeError as exc:
                    failed += 1
                    print(f"failed {task.share_id}: {exc}", file=sys.stderr)
                    return
            done += 1
            if len(tasks) == 1:
                print(json.dumps({"messageId": receipt.message_id,
                                  "routingKey": receipt.routing_key}))
            elif done % max(1, len(tasks) // 20) == 0 or done == len(tasks):
                rate = done / max(1e-9, time.monotonic() - started)
                print(f"\rpublished {done}/{len(tasks)} ({rate:,.0f}/s)", end="",
                      file=sys.stderr, flush=True)

        await asyncio.gather(*(one(t) for t in tasks))
    if len(tasks) > 1:
        print(file=sys.stderr)
        print(json.dumps({"published": done, "failed": failed}))
    return EXIT_OK if failed == 0 else EXIT_ERROR


# --- topology, dlq, contract ----------------------------------------------------------------------


async def cmd_topology(args: argparse.Namespace) -> int:
    from mlpipe.producer import Producer

    async with Producer(_settings(args), name="mlpipe-cli-topology") as p:
        t = p.topology
        print(json.dumps({
            "exchanges": [t.tasks_exchange, t.retry_exchange, t.delay_exchange,
                          t.dead_letter_exchange],
            "queues": {t.queue_name(q): list(q.routing_keys) for q in t.queues},
            "delayQueues": [t.delay_queue_name(ms) for ms in t.delay_tiers_ms],
            "deadLetterQueue": t.dead_letter_queue,
        }, indent=2))
    return EXIT_OK


async def cmd_dlq_list(args: argparse.Namespace) -> int:
    from mlpipe.dlq import list_dead

    entries = await list_dead(_settings(args), limit=args.limit)
    if args.json:
        for e in entries:
            print(json.dumps(e.as_dict()))
    else:
        print(f"{len(entries)} dead letter(s)")
        for e in entries:
            print(f"{e.message_id}  {e.reason:<20} {e.origin_queue or '-':<16} "
                  f"{e.task_type or '-':<26} {(e.error or '')[:80]}")
    return EXIT_OK


async def cmd_dlq_replay(args: argparse.Namespace) -> int:
    from mlpipe.dlq import make_filter, replay

    if not (args.all or args.id or args.reason or args.task_type or args.queue):
        raise ValueError("say which dead letters to replay: --id, --reason, --task-type, "
                         "--queue, or --all")
    match = make_filter(message_id=args.id, reason=args.reason, task_type=args.task_type,
                        queue=args.queue)
    done = await replay(_settings(args), match, limit=args.limit, dry_run=args.dry_run)
    verb = "would replay" if args.dry_run else "replayed"
    print(json.dumps({verb.replace(" ", "_"): len(done),
                      "messageIds": [e.message_id for e in done]}))
    return EXIT_OK


async def cmd_migrate(args: argparse.Namespace) -> int:
    from mlpipe.store.migrate import check, migrate

    settings = _settings(args)
    if args.check:
        status = await check(settings.database_url, schema=settings.database_schema)
        print(json.dumps({"schema": status.schema, "ok": status.ok, "missing": status.missing,
                          "changed": status.changed, "unknown": status.unknown}))
        if not status.ok:
            print(f"mlpipe: {status.problem()}", file=sys.stderr)
        return EXIT_OK if status.ok else EXIT_ERROR
    applied = await migrate(settings.database_url, schema=settings.database_schema)
    print(json.dumps({"applied": applied, "schema": settings.database_schema}))
    return EXIT_OK


async def cmd_costs(args: argparse.Namespace) -> int:
    from decimal import Decimal

    from mlpipe.store import costs
    from mlpipe.store.pool import create_pool

    settings = _settings(args)
    pool = await create_pool(settings.database_url, schema=settings.database_schema, size=2)
    try:
        rows = await costs.summary(pool, window=args.window)
        status = []
        for task_type, budget in sorted(settings.budgets.items()):
            spent = await costs.spend(pool, task_type)
            status.append({
                "taskType": task_type,
                "hourUsd": str(spent.hour_usd), "hourlyLimitUsd": budget.hourly_usd,
                "dayUsd": str(spent.day_usd), "dailyLimitUsd": budget.daily_usd,
                "hourUsedPct": _pct(spent.hour_usd, budget.hourly_usd),
                "dayUsedPct": _pct(spent.day_usd, budget.daily_usd),
            })
    finally:
        await pool.close()
    if args.json:
        print(json.dumps({"window": args.window, "spend": rows, "budgets": status},
                         default=lambda v: str(v) if isinstance(v, Decimal) else v))
        return EXIT_OK
    print(f"spend over the last {args.window}:")
    print(f"  {'task type':<26} {'model':<24} {'calls':>6} {'units':>12} {'usd':>12}")
    for r in rows:
        print(f"  {r['task_type']:<26} {r['model']:<24} {r['calls']:>6} "
              f"{r['units']:>12} {r['usd']:>12}")
    print("budgets (rolling windows):")
    for b in status:
        print(f"  {b['taskType']:<26} hour ${b['hourUsd']} of ${b['hourlyLimitUsd']} "
              f"({b['hourUsedPct']}%), day ${b['dayUsd']} of ${b['dailyLimitUsd']} "
              f"({b['dayUsedPct']}%)")
    return EXIT_OK


def _pct(spent: Any, limit: float) -> float | None:
    return round(float(spent) / limit * 100, 1) if limit else None


async def cmd_workflow_status(args: argparse.Namespace) -> int:
    import datetime

    from mlpipe.store.pool import create_pool
    from mlpipe.workflow import video

    settings = _settings(args)
    pool = await create_pool(settings.database_url, schema=settings.database_schema, size=1)
    try:
        st = await video.status(pool, args.share_id)
    finally:
        await pool.close()
    if st is None:
        print(f"no workflow for share {args.share_id}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps({"shareId": st.share_id, "state": st.state, "history": st.history}))
        return EXIT_OK
    print(f"{st.share_id}: {st.state}")
    for h in st.history:
        at = datetime.datetime.fromtimestamp(h["at"], datetime.UTC).isoformat(timespec="seconds")
        print(f"  {at}  {h['state']:<22} {h.get('detail', '')}")
    return EXIT_OK


async def cmd_contract_export(args: argparse.Namespace) -> int:
    from mlpipe.contract.schema import export

    for path in export(Path(args.dir)):
        print(path)
    return EXIT_OK


async def cmd_contract_asyncapi(args: argparse.Namespace) -> int:
    from mlpipe.contract.asyncapi import write

    return write(Path(args.path), check=args.check)


async def cmd_serve(args: argparse.Namespace) -> int:
    from mlpipe.api.cli import cmd_serve as serve

    return await serve(args)


async def cmd_contract_openapi(args: argparse.Namespace) -> int:
    from mlpipe.api.__main__ import write_openapi

    return write_openapi(Path(args.path), check=args.check)


async def cmd_search(args: argparse.Namespace) -> int:
    from consumers.embed.cli import run_search

    return await run_search(args, _settings(args))


# --- parser ---------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlpipe", description=__doc__.splitlines()[0])
    p.add_argument("--log-json", action=argparse.BooleanOptionalAction, default=None,
                   help="JSON log lines (default: when stderr is not a terminal)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--broker-url", help="overrides MLPIPE_BROKER_URL")
    sub = p.add_subparsers(metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], Coroutine[Any, Any, int]],
            help: str, parent: Any = sub) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = parent.add_parser(name, help=help, description=help)
        sp.set_defaults(func=func)
        return sp

    c = add("consume", cmd_consume, "run the daemon on the given queues")
    c.add_argument("--queues", required=True,
                   help="comma-separated short names, e.g. transcribe,embed")
    c.add_argument("--handlers", default=DEFAULT_HANDLERS,
                   help="module:attr of a Registry or of a (settings) -> Registry factory")

    pub = add("publish", cmd_publish, "publish one task, or every line of a JSONL file")
    pub.add_argument("--task-type")
    pub.add_argument("--share-id")
    pub.add_argument("--payload", help="payload as JSON")
    pub.add_argument("--file", help="JSONL: full v1 messages or {taskType, shareId, payload}")
    pub.add_argument("--in-flight", type=int, default=256, help="unconfirmed publishes at once")

    add("topology", cmd_topology, "declare exchanges and queues (idempotent) and print them")

    dlq = sub.add_parser("dlq", help="inspect and replay dead letters")
    dsub = dlq.add_subparsers(metavar="ACTION")
    dl = add("list", cmd_dlq_list, "list dead letters without removing them", dsub)
    dl.add_argument("--limit", type=int, default=100)
    dl.add_argument("--json", action="store_true", help="one JSON object per line")
    dr = add("replay", cmd_dlq_replay, "send dead letters back to their queue", dsub)
    dr.add_argument("--id", help="message id")
    dr.add_argument("--reason", help="e.g. retries_exhausted, no_handler")
    dr.add_argument("--task-type")
    dr.add_argument("--queue", help="origin queue (full name, e.g. ml.embed)")
    dr.add_argument("--all", action="store_true")
    dr.add_argument("--limit", type=int, default=10_000)
    dr.add_argument("--dry-run", action="store_true")

    mi = add("migrate", cmd_migrate,
             "apply pending SQL migrations (safe to run from many replicas)")
    mi.add_argument("--check", action="store_true",
                    help="apply nothing; exit 1 naming the migrations the schema lacks or "
                         "that changed since they were applied")
    co = add("costs", cmd_costs, "spend by task type and model, and budget status")
    co.add_argument("--window", default="1 day", help="a Postgres interval, e.g. '7 days'")
    co.add_argument("--json", action="store_true")

    se = add("serve", cmd_serve, "the read API: search, results, workflow state and (admin "
                                 "token) cost analytics over HTTP")
    se.add_argument("--host", help="address to listen on (default: MLPIPE_API_HOST, "
                                   "127.0.0.1); other than loopback needs API tokens")
    se.add_argument("--port", type=int, help="default: MLPIPE_API_PORT, 8080; 0 picks one")
    se.add_argument("--backend", choices=["api", "local"],
                    help="how query texts are embedded (default: api when an API key is "
                         "configured, else the local model)")

    from consumers.embed.cli import add_search_arguments

    add_search_arguments(add("search", cmd_search, "similarity search over the stored chunks: "
                                                   "share ids, chunk text, timestamps, score"))

    wf = sub.add_parser("workflow", help="video workflow state")
    wsub = wf.add_subparsers(metavar="ACTION")
    ws = add("status", cmd_workflow_status, "state and history of a share's workflow", wsub)
    ws.add_argument("share_id")
    ws.add_argument("--json", action="store_true")

    con = sub.add_parser("contract", help="contract v1 tools")
    csub = con.add_subparsers(metavar="ACTION")
    ce = add("export", cmd_contract_export, "write the JSON Schema files", csub)
    ce.add_argument("--dir", default="contracts")
    cop = add("openapi", cmd_contract_openapi, "write the read API's OpenAPI document", csub)
    cop.add_argument("path", nargs="?", default="contracts/openapi.json")
    cop.add_argument("--check", action="store_true",
                     help="exit 1 if the file differs from the generated document")
    cap = add("asyncapi", cmd_contract_asyncapi,
              "write the AsyncAPI 3.0 document of the broker topology", csub)
    cap.add_argument("path", nargs="?", default="contracts/asyncapi.json")
    cap.add_argument("--check", action="store_true",
                     help="exit 1 if the file differs from the generated document")
    return p


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

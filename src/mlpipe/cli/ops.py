"""Operating commands: topology, check, dead letters, migrations, costs, workflow state."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .common import EXIT_ERROR, EXIT_OK, Add
from .common import settings_from as _settings


async def cmd_check(args: argparse.Namespace) -> int:
    from mlpipe.broker.topology import parse_queue_names
    from mlpipe.check import FAIL, run_checks

    findings = await run_checks(_settings(args), parse_queue_names(args.queues))
    for finding in findings:
        print(finding.line())
    failed = [f for f in findings if f.status == FAIL]
    print(f"mlpipe check: {len(failed)} of {len(findings)} checks FAILED" if failed
          else f"mlpipe check: all {len(findings)} checks ok")
    return EXIT_ERROR if failed else EXIT_OK



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


def register(add: Add, sub: Any) -> None:
    add("topology", cmd_topology, "declare exchanges and queues (idempotent) and print them")

    ck = add("check", cmd_check, "probe broker and topology, Redis, Postgres (pgvector, "
                                 "migrations), models, ffmpeg and API config; exit 1 on a "
                                 "failure, naming the fix")
    ck.add_argument("--queues", default="transcribe,summarize,embed",
                    help="the queues this deployment runs (their needs are checked)")

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

    wf = sub.add_parser("workflow", help="video workflow state")
    wsub = wf.add_subparsers(metavar="ACTION")
    ws = add("status", cmd_workflow_status, "state and history of a share's workflow", wsub)
    ws.add_argument("share_id")
    ws.add_argument("--json", action="store_true")

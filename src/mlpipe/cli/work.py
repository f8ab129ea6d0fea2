"""Commands that move work: ``consume`` runs the daemon, ``publish`` sends tasks."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from mlpipe.errors import MlpipeError

from .common import EXIT_ERROR, EXIT_FORCED, EXIT_OK, EXIT_RECYCLED, Add
from .common import settings_from as _settings

DEFAULT_HANDLERS = "consumers:build_registry"


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


def register(add: Add) -> None:
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

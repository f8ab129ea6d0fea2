"""A registry whose one handler does nothing, for ``mlpipe consume --handlers`` in the memory
workload: the daemon is measured without any model or client loaded."""

from __future__ import annotations

from typing import Any

from mlpipe.contract.models import EmbedTask, TaskType
from mlpipe.handlers import HandlerResult, Registry, TaskContext


async def noop(task: EmbedTask, ctx: TaskContext) -> HandlerResult:
    return HandlerResult({"ok": True})


def build_registry(settings: Any) -> Registry:
    registry = Registry()
    registry.register(TaskType.EMBED_VECTORS, noop)
    return registry

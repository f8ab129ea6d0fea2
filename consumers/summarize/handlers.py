"""``summarize_llm`` and ``summarize_video_combined``: one handler shape for both.

Each task type differs only in how its payload becomes a ``Source``; preflight (binary, too
short), backend choice, fitting to the context, the call and the result are shared. The cost
estimator runs the same preflight and plan as the handler, so junk is dead-lettered before any
budget is reserved and the reservation matches the request that is then sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from mlpipe.backends import LazyClient, backend_for, lazy_client, prices
from mlpipe.contract.models import (
    Backend,
    SummarizeOptions,
    SummarizeTask,
    SummarizeVideoCombinedTask,
    Task,
    TaskType,
)
from mlpipe.errors import PermanentError
from mlpipe.handlers import Handler, HandlerResult, Registry, TaskContext
from mlpipe.settings import Settings

from . import local
from .source import Source, article_source, video_source
from .tokens import Tokenizers

#: ``options.maxLength`` when the task gives none. maxLength counts *tokens* of the summary
#: (the API's ``max_tokens``; for the offline backend, tokens of the same tokenizer), because
#: tokens are what is billed and what the context window is measured in.
DEFAULT_MAX_LENGTH = 256
#: Resource names, as handlers find them in ``ctx.resources``.
if TYPE_CHECKING:
    pass

CLIENT = "summarize.openai"
TOKENIZERS = "summarize.tokenizers"
#: Typical run (the lock lives 1.5x this, renewed while running).
EXPECTED_RUNTIME_S = 30.0
#: Slack over the API timeout for fitting, the offline summariser and the call's own overhead.
TIMEOUT_SLACK_S = 60.0

SummaryTask = SummarizeTask | SummarizeVideoCombinedTask
ToSource = Callable[[Any], Source]


def register(registry: Registry, settings: Settings) -> None:
    tokenizers = Tokenizers()
    registry.add_resource(TOKENIZERS, lambda: _tokenizers(tokenizers))
    registry.add_resource(CLIENT, lambda: lazy_client(settings))
    limits = {"timeout_s": settings.api_timeout_s + TIMEOUT_SLACK_S,
              "expected_runtime_s": EXPECTED_RUNTIME_S}
    article, video = _handler(settings, article_source), _handler(settings, video_source)

    @registry.handler(TaskType.SUMMARIZE_LLM, **limits,
                      estimate_cost=_estimator(settings, tokenizers, article_source))
    async def summarize_llm(task: SummarizeTask, ctx: TaskContext) -> HandlerResult:
        return await article(task, ctx)

    @registry.handler(TaskType.SUMMARIZE_VIDEO_COMBINED, **limits,
                      estimate_cost=_estimator(settings, tokenizers, video_source))
    async def summarize_video_combined(task: SummarizeVideoCombinedTask,
                                       ctx: TaskContext) -> HandlerResult:
        return await video(task, ctx)


def api_model(settings: Settings, options: SummarizeOptions) -> str:
    """The deployment's model wins (it is what the budget was planned for); setting
    ``MLPIPE_SUMMARIZE_API_MODEL`` to an empty string lets each task choose its own."""
    model = settings.summarize_api_model or options.model
    if not model:
        raise PermanentError("no summarisation model: MLPIPE_SUMMARIZE_API_MODEL is empty and "
                             "the task has no options.model", reason="no_model")
    return model


def _handler(settings: Settings, to_source: ToSource) -> Handler:
    price_list = prices(settings)

    async def handle(task: SummaryTask, ctx: TaskContext) -> HandlerResult:
        source = to_source(task.payload)
        options = task.payload.options
        max_tokens = options.max_length or DEFAULT_MAX_LENGTH
        tokenizers: Tokenizers = ctx.resources[TOKENIZERS]
        if backend_for(task, settings) is Backend.LOCAL:
            summary = await local.summarize(source, max_tokens, tokenizers)
        else:
            model = api_model(settings, options)
            tokenizer = await tokenizers.for_model_async(model)
            from . import remote  # the API path only: openai's SDK loads when first needed

            request = await asyncio.to_thread(remote.plan, source, model, max_tokens, tokenizer,
                                              price_list)
            client: LazyClient = ctx.resources[CLIENT]
            summary = await remote.summarize(client.get(), request, tokenizer, ctx.log)
        ctx.log.info("summarize.done", backend=summary.backend, model=summary.model,
                     input_tokens=summary.input_tokens, output_tokens=summary.output_tokens,
                     truncated=summary.truncated)
        return summary.result()

    return handle


def _estimator(settings: Settings, tokenizers: Tokenizers,
               to_source: ToSource) -> Callable[[Task], Awaitable[Decimal]]:
    """Off the event loop: the first paid task loads the vocabulary (about 60 MB, half a
    second), so a worker that never summarises never holds it, and ``remote.estimate``'s
    tokenizer pass (a tenth of a second for a 2-million-character text) runs in a thread."""
    price_list = prices(settings)

    async def estimate(task: Task) -> Decimal:
        if backend_for(task, settings) is Backend.LOCAL:
            return Decimal(0)
        assert isinstance(task, SummarizeTask | SummarizeVideoCombinedTask)
        source = to_source(task.payload)
        options = task.payload.options
        model = api_model(settings, options)
        from . import remote

        tokenizer = await tokenizers.for_model_async(model)
        return await asyncio.to_thread(remote.estimate, source, model,
                                       options.max_length or DEFAULT_MAX_LENGTH, tokenizer,
                                       price_list)

    return estimate


@asynccontextmanager
async def _tokenizers(tokenizers: Tokenizers) -> AsyncIterator[Tokenizers]:
    """Nothing is loaded here: a vocabulary loads on the first task that needs it."""
    yield tokenizers

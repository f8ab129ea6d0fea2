"""The API backend: one chat completion on an OpenAI-compatible server.

``plan`` is pure and shared with the cost estimator, so the budget is reserved for exactly the
request the handler then sends; the real cost is taken from the ``usage`` the server returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

import openai
import structlog
from openai.types.chat import ChatCompletionMessageParam

from mlpipe.backends import OPENAI_PRICES, PriceList, api_errors
from mlpipe.errors import PermanentError, TransientError
from mlpipe.handlers import Cost

from .outcome import Summary
from .preflight import Tokenizer
from .prompts import messages, overhead_tokens, prompt_tokens
from .source import Source, fit
from .tokens import context_window

#: Below this many tokens left for the text, the request is refused as misconfigured.
MIN_TEXT_BUDGET = 256


@dataclass(frozen=True)
class Plan:
    model: str
    max_tokens: int
    messages: list[ChatCompletionMessageParam]
    #: Our tiktoken count of the prompt; the estimate, not what is billed.
    prompt_tokens: int
    truncated: bool
    #: The server's prices (``mlpipe.backends.prices``): zero for a self-hosted one.
    prices: PriceList = OPENAI_PRICES

    def estimated_cost(self) -> Decimal:
        """Prompt at its counted size, answer at its ceiling: the most this call can cost."""
        return self.prices.token_cost(self.model, self.prompt_tokens, self.max_tokens)


def plan(source: Source, model: str, max_tokens: int, tokenizer: Tokenizer,
         prices: PriceList = OPENAI_PRICES) -> Plan:
    """Fit the source into ``context - max_tokens - instructions`` and build the messages."""
    budget = _text_budget(source, model, max_tokens, tokenizer)
    fitted = fit(source, budget, tokenizer)
    msgs = messages(fitted.source, max_tokens)
    return Plan(model, max_tokens, msgs, prompt_tokens(msgs, tokenizer), fitted.truncated,
                prices)


def estimate(source: Source, model: str, max_tokens: int, tokenizer: Tokenizer,
             prices: PriceList = OPENAI_PRICES) -> Decimal:
    """What ``plan(...).estimated_cost()`` would say, or a hair more for inputs that need
    cutting: the prompt is counted whole and capped at what the context admits, one tokenizer
    pass and no sentence search, because the estimator runs on the event loop."""
    _text_budget(source, model, max_tokens, tokenizer)
    whole = prompt_tokens(messages(source, max_tokens), tokenizer)
    prompt = min(whole, context_window(model) - max_tokens)
    return prices.token_cost(model, prompt, max_tokens)


def _text_budget(source: Source, model: str, max_tokens: int, tokenizer: Tokenizer) -> int:
    context = context_window(model)
    budget = context - max_tokens - overhead_tokens(source, max_tokens, tokenizer)
    if budget < MIN_TEXT_BUDGET:
        raise PermanentError(
            f"maxLength {max_tokens} leaves {budget} tokens for the text in {model}'s context "
            f"of {context} tokens (at least {MIN_TEXT_BUDGET} needed)",
            reason="max_length_too_large")
    return budget


async def summarize(client: openai.AsyncOpenAI, request: Plan, tokenizer: Tokenizer,
                    log: structlog.typing.FilteringBoundLogger) -> Summary:
    async with api_errors("summarize"):
        response = await client.chat.completions.create(
            model=request.model, messages=request.messages, max_tokens=request.max_tokens)
    choice = response.choices[0] if response.choices else None
    text = (choice.message.content or "").strip() if choice is not None else ""
    if not text:
        if choice is not None and choice.finish_reason == "content_filter":
            raise PermanentError(f"{request.model} refused to summarise the content",
                                 reason="content_filtered")
        raise TransientError(f"{request.model} returned an empty summary",
                             reason="empty_completion")
    if choice is not None and choice.finish_reason == "length":
        log.warning("summarize.answer_cut_at_max_tokens", max_tokens=request.max_tokens)
    if response.usage is not None:
        prompt, completion = response.usage.prompt_tokens, response.usage.completion_tokens
    else:  # some OpenAI-compatible servers omit usage; bill our own count rather than nothing
        log.warning("summarize.no_usage_reported", model=request.model)
        prompt, completion = request.prompt_tokens, tokenizer.count(text)
    cost = Cost(units=prompt + completion, unit_kind="tokens",
                usd=request.prices.token_cost(request.model, prompt, completion),
                model=request.model)
    return Summary(summary=text, model=request.model, backend="api", input_tokens=prompt,
                   output_tokens=completion, truncated=request.truncated,
                   model_version=response.model or request.model, cost=cost)

"""What every handler shares about backends: which one serves a task, the OpenAI-compatible
client, its prices, and how its errors map onto mlpipe's outcome types."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from decimal import Decimal

import openai
import structlog

from mlpipe.contract.models import Backend, Task
from mlpipe.errors import PermanentError, TransientError
from mlpipe.settings import Settings

log = structlog.get_logger(__name__)

#: USD prices of OpenAI models (input per 1M tokens, output per 1M tokens; audio per minute).
#: Unknown models served by a self-hosted OpenAI-compatible server cost nothing.
TOKEN_PRICES: dict[str, tuple[Decimal, Decimal]] = {
    "gpt-4o-mini": (Decimal("0.15"), Decimal("0.60")),
    "gpt-4o": (Decimal("2.50"), Decimal("10.00")),
    "gpt-4.1-mini": (Decimal("0.40"), Decimal("1.60")),
    "text-embedding-3-small": (Decimal("0.02"), Decimal("0")),
    "text-embedding-3-large": (Decimal("0.13"), Decimal("0")),
}
AUDIO_PRICE_PER_MINUTE: dict[str, Decimal] = {
    "whisper-1": Decimal("0.006"),
}


def token_cost(model: str, input_tokens: int, output_tokens: int = 0) -> Decimal:
    price_in, price_out = TOKEN_PRICES.get(model, (Decimal(0), Decimal(0)))
    return (price_in * input_tokens + price_out * output_tokens) / Decimal(1_000_000)


def audio_cost(model: str, seconds: float) -> Decimal:
    per_minute = AUDIO_PRICE_PER_MINUTE.get(model, Decimal(0))
    return per_minute * Decimal(str(seconds)) / Decimal(60)


def backend_for(task: Task, settings: Settings) -> Backend:
    """The task's ``options.backend`` if it names one, else the API when a key is configured,
    else the local models. Asking for the API with no key configured falls back to local: a
    pipeline without a key still works, offline."""
    wanted = task.payload.options.backend
    if wanted is Backend.LOCAL:
        return Backend.LOCAL
    if settings.openai_api_key is None:
        if wanted is Backend.API:
            log.warning("backend.api_without_key", task_type=task.task_type.value,
                        fallback="local")
        return Backend.LOCAL
    return Backend.API


def make_client(settings: Settings) -> openai.AsyncOpenAI:
    key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else "unset"
    return openai.AsyncOpenAI(api_key=key, base_url=settings.openai_base_url,
                              timeout=settings.api_timeout_s, max_retries=0)


@contextlib.asynccontextmanager
async def api_errors(what: str) -> AsyncIterator[None]:
    """OpenAI SDK errors -> outcome types. Rate limits, timeouts, connection trouble and 5xx
    are transient (retried with backoff by the daemon, not by the SDK); other 4xx mean the
    request itself is wrong and will not get better."""
    try:
        yield
    except openai.RateLimitError as exc:
        raise TransientError(f"{what}: rate limited: {exc}", reason="rate_limited",
                             delay_s=_retry_after(exc)) from exc
    except (openai.APITimeoutError, openai.APIConnectionError, openai.InternalServerError) as exc:
        raise TransientError(f"{what}: {type(exc).__name__}: {exc}",
                             reason="api_unavailable") from exc
    except openai.APIStatusError as exc:
        if exc.status_code >= 500 or exc.status_code in (408, 409):
            raise TransientError(f"{what}: HTTP {exc.status_code}: {exc}",
                                 reason="api_unavailable") from exc
        raise PermanentError(f"{what}: HTTP {exc.status_code}: {exc}",
                             reason="api_rejected") from exc


def _retry_after(exc: openai.APIStatusError) -> float | None:
    raw = exc.response.headers.get("retry-after") if exc.response is not None else None
    try:
        return float(raw) if raw else None
    except ValueError:
        return None

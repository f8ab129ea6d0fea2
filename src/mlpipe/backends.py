"""What every handler shares about backends: which one serves a task, the OpenAI-compatible
client, its prices, and how its errors map onto mlpipe's outcome types."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING

import structlog

from mlpipe.contract.models import Backend, Task, TaskType
from mlpipe.errors import PermanentError, TransientError
from mlpipe.settings import Settings

if TYPE_CHECKING:  # the SDK is imported when a client is made: a worker without one never
    import openai  # pays for it

log = structlog.get_logger(__name__)

#: USD prices of OpenAI models (input per 1M tokens, output per 1M tokens; audio per minute).
#: Unknown models cost nothing unless ``MLPIPE_OPENAI_PRICES`` names them.
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

#: Task types a keyless ``MLPIPE_OPENAI_BASE_URL`` serves. Transcription is not one of them:
#: Ollama and llama.cpp's server have no ``/audio/transcriptions``, so pointing summaries at
#: them must not send every transcription there to fail; a whisper server takes a key.
KEYLESS_TASK_TYPES = frozenset({TaskType.SUMMARIZE_LLM, TaskType.SUMMARIZE_VIDEO_COMBINED,
                                TaskType.EMBED_VECTORS})


@dataclass(frozen=True)
class PriceList:
    """What the API backends charge, per model. Unknown models cost nothing: a paid model
    someone forgot to price shows up as zero spend in the ledger, with its token counts."""

    tokens: Mapping[str, tuple[Decimal, Decimal]]
    audio_per_minute: Mapping[str, Decimal]

    def token_cost(self, model: str, input_tokens: int, output_tokens: int = 0) -> Decimal:
        price_in, price_out = self.tokens.get(model, (Decimal(0), Decimal(0)))
        return (price_in * input_tokens + price_out * output_tokens) / Decimal(1_000_000)

    def audio_cost(self, model: str, seconds: float) -> Decimal:
        per_minute = self.audio_per_minute.get(model, Decimal(0))
        return per_minute * Decimal(str(seconds)) / Decimal(60)


OPENAI_PRICES = PriceList(TOKEN_PRICES, AUDIO_PRICE_PER_MINUTE)


def self_hosted(settings: Settings) -> bool:
    """A base URL without a key: an Ollama, vLLM or llama.cpp server of the deployment's own,
    not a provider that bills per token."""
    return settings.openai_base_url is not None and settings.openai_api_key is None


def prices(settings: Settings) -> PriceList:
    """OpenAI's list for a keyed API (``MLPIPE_OPENAI_PRICES`` on top); only the configured
    prices for a self-hosted server, so its tokens are recorded at zero cost unless the
    deployment puts a price on them (e.g. to account for its GPUs)."""
    base = PriceList({}, {}) if self_hosted(settings) else OPENAI_PRICES
    return PriceList({**base.tokens, **settings.openai_prices}, base.audio_per_minute)


def token_cost(model: str, input_tokens: int, output_tokens: int = 0) -> Decimal:
    """At OpenAI's list prices."""
    return OPENAI_PRICES.token_cost(model, input_tokens, output_tokens)


def audio_cost(model: str, seconds: float) -> Decimal:
    """At OpenAI's list prices."""
    return OPENAI_PRICES.audio_cost(model, seconds)


def api_available(settings: Settings, task_type: TaskType) -> bool:
    """Whether an OpenAI-compatible API serves ``task_type``: a key is set, or a base URL is
    (no key needed for a self-hosted server) and the task type is one such servers offer."""
    if settings.openai_api_key is not None:
        return True
    return settings.openai_base_url is not None and task_type in KEYLESS_TASK_TYPES


def backend_for(task: Task, settings: Settings) -> Backend:
    """The task's ``options.backend`` if it names one, else the API when one is configured
    (``api_available``), else the local models. Asking for the API with none configured falls
    back to local: a pipeline without a key or server still works, offline."""
    wanted = task.payload.options.backend
    if wanted is Backend.LOCAL:
        return Backend.LOCAL
    if not api_available(settings, task.task_type):
        if wanted is Backend.API:
            log.warning("backend.api_not_configured", task_type=task.task_type.value,
                        fallback="local")
        return Backend.LOCAL
    return Backend.API


def make_client(settings: Settings) -> openai.AsyncOpenAI:
    """The SDK insists on a key; a self-hosted server ignores the placeholder it is sent."""
    import openai

    key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else "unset"
    return openai.AsyncOpenAI(api_key=key, base_url=settings.openai_base_url,
                              timeout=settings.api_timeout_s, max_retries=0)


class LazyClient:
    """One OpenAI-compatible client per daemon, made on its first call: importing the SDK
    costs about 50 MB of resident memory, which a worker that has not called the API yet (or
    never will: a key is set on every pod of a Deployment, whatever its queue) should not
    hold."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._client: openai.AsyncOpenAI | None = None

    def get(self) -> openai.AsyncOpenAI:
        if self._client is None:
            self._client = make_client(self._settings)
        return self._client

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()


@contextlib.asynccontextmanager
async def lazy_client(settings: Settings) -> AsyncIterator[LazyClient]:
    """A daemon resource: the client (and its connection pool) is closed after the drain."""
    client = LazyClient(settings)
    try:
        yield client
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def api_errors(what: str) -> AsyncIterator[None]:
    """OpenAI SDK errors -> outcome types. Rate limits, timeouts, connection trouble and 5xx
    are transient (retried with backoff by the daemon, not by the SDK); other 4xx mean the
    request itself is wrong and will not get better."""
    import openai

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

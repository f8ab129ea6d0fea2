"""The one settings object of mlpipe.

Everything configurable is read here from ``MLPIPE_*`` environment variables (or passed in
explicitly) and handed down; no other module reads the environment. Unknown ``MLPIPE_`` keys
are rejected so that a typo in a deployment manifest fails at start-up instead of being
silently ignored.
"""

from __future__ import annotations

import os
from decimal import Decimal
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from mlpipe.broker.urls import BrokerUrl

#: Short queue names accepted by ``mlpipe consume --queues`` and their default tuning.
#: Transcription is slow and memory-heavy, so it takes one message at a time; embedding is
#: cheap per message and benefits from a deep prefetch so micro-batches can fill up.
DEFAULT_QUEUE_TUNING: dict[str, dict[str, int]] = {
    "transcribe": {"prefetch": 2, "concurrency": 1},
    "summarize": {"prefetch": 16, "concurrency": 8},
    # API embeddings wait on the network, not the CPU: with 32 in flight a worker idled at
    # ~200 msg/s against a 50 ms API (make bench, embed_api); 128 fill the batcher's calls
    # until the event loop's CPU is the limit (~360 msg/s). Calls to the API stay bounded
    # by the batcher (consumers.embed.API_CONCURRENT_CALLS, 4), not by this.
    "embed": {"prefetch": 256, "concurrency": 128},
    "transcribe_local": {"prefetch": 1, "concurrency": 1},
    "summarize_local": {"prefetch": 4, "concurrency": 2},
    "embed_local": {"prefetch": 64, "concurrency": 32},
}


class QueueTuning(BaseModel):
    """Flow control for one queue: how many deliveries the broker may push ahead of us
    (``prefetch``) and how many handlers run at once (``concurrency``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prefetch: int = Field(default=16, ge=1, le=65535)
    concurrency: int = Field(default=8, ge=1, le=10000)

    @model_validator(mode="after")
    def _prefetch_covers_concurrency(self) -> QueueTuning:
        if self.prefetch < self.concurrency:
            raise ValueError(
                f"prefetch ({self.prefetch}) below concurrency ({self.concurrency}) "
                "would leave handler slots idle forever"
            )
        return self


class RetryPolicy(BaseModel):
    """Backoff for transient failures. Delay for retry ``n`` (0-based) is
    ``min(max_delay, base_delay * 2**n)``, shortened by up to ``jitter`` (a fraction) at
    random so that a burst of failures does not come back as a burst."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_retries: int = Field(default=5, ge=0, le=30)
    base_delay_s: float = Field(default=1.0, gt=0)
    max_delay_s: float = Field(default=300.0, gt=0)
    jitter: float = Field(default=0.2, ge=0, lt=1)


def _celery_defaults() -> dict[str, str]:
    from mlpipe.contract.celery import DEFAULT_TASK_MAP

    return DEFAULT_TASK_MAP


class Budget(BaseModel):
    """Spend ceilings for one task type, in USD; 0 means no ceiling."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hourly_usd: float = Field(default=0.0, ge=0)
    daily_usd: float = Field(default=0.0, ge=0)


#: The original system's ceilings: transcription $1/h, $10/day; LLM $2/h, $20/day;
#: embeddings $1/h, $10/day.
DEFAULT_BUDGETS: dict[str, dict[str, float]] = {
    "transcribe_whisper": {"hourly_usd": 1.0, "daily_usd": 10.0},
    "summarize_llm": {"hourly_usd": 2.0, "daily_usd": 20.0},
    "summarize_video_combined": {"hourly_usd": 2.0, "daily_usd": 20.0},
    "embed_vectors": {"hourly_usd": 1.0, "daily_usd": 10.0},
}


class Settings(BaseSettings):
    """Configuration of a producer or a daemon. Every field maps to ``MLPIPE_<FIELD>``;
    nested models take JSON, e.g. ``MLPIPE_RETRY='{"max_retries": 3}'``."""

    model_config = SettingsConfigDict(
        env_prefix="MLPIPE_", extra="forbid", frozen=True, env_nested_delimiter="__",
        # a refused URL must not be echoed into logs: broker and database URLs hold passwords
        hide_input_in_errors=True,
    )

    # --- services -------------------------------------------------------------------------
    #: AMQP URL, vhost in the path. A cluster's nodes go in one URL, comma-separated:
    #: ``amqp://u:p@rabbit-0:5672,rabbit-1:5672,rabbit-2:5672/vhost``; connections start at a
    #: random node and fail over to the next (``mlpipe.broker.urls``).
    broker_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    redis_url: str = "redis://127.0.0.1:6379/0"
    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"

    # --- topology -------------------------------------------------------------------------
    #: Prefix of every exchange and queue mlpipe declares; lets several isolated pipelines
    #: share a vhost.
    namespace: str = Field(default="", pattern=r"^[A-Za-z0-9_.-]*$")
    #: Consume work queues that already exist with other arguments (e.g. declared by the Celery
    #: workers being replaced) as they are, instead of refusing to start. mlpipe only adds its
    #: bindings to them; their own dead-lettering and delivery limit stay whatever they were.
    adopt_existing_queues: bool = False
    #: Celery task name -> contract task type, for consuming the original system's messages.
    celery_task_map: dict[str, str] = Field(default_factory=lambda: dict(_celery_defaults()))
    #: Quorum-queue ``x-delivery-limit``: guards against crash loops (a message that kills the
    #: worker is redelivered at most this many times). Retries of handler errors go through
    #: the delay queues and do not count against it.
    delivery_limit: int = Field(default=10, ge=1)

    # --- consuming ------------------------------------------------------------------------
    queues: dict[str, QueueTuning] = Field(
        default_factory=lambda: {k: QueueTuning(**v) for k, v in DEFAULT_QUEUE_TUNING.items()}
    )
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    #: Default wall-clock limit of one handler run; handlers may register their own.
    handler_timeout_s: float = Field(default=900.0, gt=0)
    #: How long SIGTERM waits for in-flight handlers before cancelling them. Keep it below the
    #: pod's ``terminationGracePeriodSeconds``.
    shutdown_grace_s: float = Field(default=25.0, ge=0)
    #: Drain and exit after this many deliveries (0: never); Kubernetes starts a fresh process.
    max_tasks: int = Field(default=0, ge=0)
    #: Drain and exit once resident memory exceeds this many MiB (0: never).
    max_rss_mb: int = Field(default=0, ge=0)

    # --- effects: locks, results, budgets ---------------------------------------------------
    #: Postgres schema holding mlpipe's tables (``search_path`` is ``<schema>, public`` so the
    #: pgvector extension in ``public`` is found).
    database_schema: str = Field(default="public", pattern=r"^[a-z_][a-z0-9_]*$")
    database_pool_size: int = Field(default=10, ge=1)
    #: How long start-up waits for Postgres to accept connections: a replica started during a
    #: database restart or failover waits it out instead of crash-looping.
    startup_wait_s: float = Field(default=60.0, ge=0)
    #: Prefix of the Redis lock keys.
    lock_prefix: str = "mlpipe:"
    #: How long persisting a finished result is retried in-process (a Postgres blip must not
    #: throw away paid work) before the delivery is retried from scratch.
    persist_retry_s: float = Field(default=60.0, ge=0)
    #: How long a finished result that could not be stored stays parked in Redis for the
    #: delivery's retry to store instead of paying for the handler again.
    parked_result_ttl_s: float = Field(default=86_400.0, gt=0)
    #: Every so often a daemon publishes outbox rows left unpublished this long (an event whose
    #: delivery was lost after its result committed); 0 turns the sweep off.
    outbox_sweep_s: float = Field(default=60.0, ge=0)
    #: Deferrals (another worker holds the lock for a different input) before dead-lettering
    #: with ``lock_contention``.
    max_deferrals: int = Field(default=50, ge=1)
    budgets: dict[str, Budget] = Field(
        default_factory=lambda: {k: Budget(**v) for k, v in DEFAULT_BUDGETS.items()}
    )
    #: What a task over budget does: ``dead_letter`` (permanent ``budget_exceeded``) or
    #: ``retry`` (wait ``budget_retry_delay_s`` and try again, not counted as a retry).
    budget_action: str = Field(default="dead_letter", pattern=r"^(dead_letter|retry)$")
    budget_retry_delay_s: float = Field(default=300.0, gt=0)

    # --- handlers: backends, models, media ---------------------------------------------------
    #: Key of an OpenAI-compatible API. Unset: every task uses the offline local backends.
    openai_api_key: SecretStr | None = None
    #: Base URL of the OpenAI-compatible API (OpenAI, Ollama, vLLM, LocalAI, a whisper server).
    openai_base_url: str | None = None
    #: USD per 1M tokens, ``[input, output]``, by model name, over the built-in OpenAI list,
    #: e.g. ``{"llama3.1:8b": [0.05, 0.10]}``. A server at ``openai_base_url`` with no key is
    #: self-hosted: it bills nothing unless its model is listed here.
    openai_prices: dict[str, tuple[Annotated[Decimal, Field(ge=0)],
                                   Annotated[Decimal, Field(ge=0)]]] = Field(default_factory=dict)
    api_timeout_s: float = Field(default=120.0, gt=0)
    transcribe_api_model: str = "whisper-1"
    summarize_api_model: str = "gpt-4o-mini"
    embed_api_model: str = "text-embedding-3-small"
    #: Directory of a faster-whisper (CTranslate2) model for local transcription.
    whisper_model_dir: str | None = None
    #: Directory of a sentence-embedding model (ONNX, MiniLM family) for local embeddings.
    embedding_model_dir: str | None = None
    #: Where local faster-whisper runs: ``auto`` (CUDA when CTranslate2 sees a GPU, else the
    #: CPU), ``cpu`` or ``cuda``. An explicit value this machine cannot honour stops the worker
    #: at start-up rather than running a GPU worker on its CPU.
    whisper_device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda)$")
    #: CTranslate2 compute type of local Whisper: ``auto`` (``float16`` on CUDA, ``int8`` on
    #: the CPU) or one CTranslate2 supports on that device.
    whisper_compute_type: str = Field(
        default="auto", pattern=r"^(auto|default|int8|int8_float32|int8_float16|int8_bfloat16"
                                r"|int16|float16|bfloat16|float32)$")
    #: Where the local ONNX embedder runs: ``auto`` (onnxruntime's CUDA provider when the
    #: installed onnxruntime has it, i.e. ``onnxruntime-gpu``, else the CPU), ``cpu`` or ``cuda``.
    embedding_device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda)$")
    #: Local media paths are readable only under these directories; anything else is refused.
    media_roots: list[str] = Field(default_factory=list)
    #: A media URL from the broker is hostile: ``http(s)`` fetches dial only public unicast
    #: addresses. These opt in the internal hosts a deployment really keeps media on: exact
    #: host names or ``*.suffix`` (JSON list), and networks (CIDR, JSON list) whose addresses
    #: may be dialled although they are private, loopback or link-local.
    media_allowed_hosts: list[str] = Field(default_factory=list)
    media_allow_private_networks: list[str] = Field(default_factory=list)
    #: ``s3://`` media only from these buckets: the worker's credentials must not read every
    #: object its role can read on a publisher's say-so. Empty: every S3 URL is refused.
    media_s3_buckets: list[str] = Field(default_factory=list)
    #: Redirects an ``http(s)`` fetch follows, each hop checked like the first URL.
    media_max_redirects: int = Field(default=5, ge=0, le=20)
    media_max_bytes: int = Field(default=500 * 1024 * 1024, gt=0)
    media_timeout_s: float = Field(default=60.0, gt=0)
    #: Longest audio accepted for transcription (the original system's 30 minutes).
    max_audio_s: float = Field(default=1800.0, gt=0)
    #: S3-compatible endpoint (MinIO, moto); credentials come from the usual AWS variables.
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    #: Embedding micro-batching: gather up to this many texts, or wait at most this long.
    embed_batch_size: int = Field(default=64, ge=1)
    embed_batch_wait_ms: float = Field(default=20.0, ge=0)

    #: A video share whose transcript has not arrived this long after transcription started
    #: falls back to caption-only (``failed_transcription``).
    workflow_timeout_s: float = Field(default=1800.0, gt=0)

    # --- observability ----------------------------------------------------------------------
    #: Port of /metrics, /healthz and /readyz (0: an ephemeral port; -1: no HTTP server).
    http_port: int = Field(default=9464, ge=-1, le=65535)
    http_host: str = "0.0.0.0"

    # --- read API (``mlpipe serve``) ----------------------------------------------------------
    #: Address of the read API. Anything but loopback needs tokens: the API refuses to start
    #: without them rather than hand every result and the cost ledger to the network.
    api_host: str = "127.0.0.1"
    #: Port of the read API (0: an ephemeral port).
    api_port: int = Field(default=8080, ge=0, le=65535)
    #: Bearer tokens that read search, results and workflow state (JSON list, each at least
    #: 16 characters).
    api_tokens: list[SecretStr] = Field(default_factory=list)
    #: Bearer tokens that also read the cost and budget analytics.
    api_admin_tokens: list[SecretStr] = Field(default_factory=list)
    api_pool_size: int = Field(default=4, ge=1)

    # --- broker connection and publishing --------------------------------------------------
    reconnect_base_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=30.0, gt=0)
    confirm_timeout_s: float = Field(default=10.0, gt=0)
    #: How long ``Producer.publish`` may wait in total (outage included) before raising.
    publish_timeout_s: float = Field(default=60.0, gt=0)
    #: Publishes allowed to wait for a connection; one more raises ``BufferFull``.
    publish_buffer_size: int = Field(default=10_000, ge=1)
    #: Consecutive failed connection attempts after which the circuit opens and publishes
    #: fail fast with ``CircuitOpen`` instead of queueing behind a dead broker.
    circuit_failure_threshold: int = Field(default=8, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_env(cls, data: Any) -> Any:
        """pydantic-settings ignores unknown environment variables; a misspelt
        ``MLPIPE_MAX_TASK`` in a manifest must fail loudly instead."""
        known = {f"MLPIPE_{name.upper()}" for name in cls.model_fields}
        unknown = sorted(k for k in os.environ
                         if k.upper().startswith("MLPIPE_") and k.upper().split("__")[0]
                         not in known)
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown}; known: {sorted(known)}")
        return data

    @field_validator("queues", mode="after")
    @classmethod
    def _keep_default_tuning(cls, value: dict[str, QueueTuning]) -> dict[str, QueueTuning]:
        """Overriding one queue must not reset the tuning of the others."""
        defaults = {k: QueueTuning(**v) for k, v in DEFAULT_QUEUE_TUNING.items()}
        return {**defaults, **value}

    @field_validator("budgets", mode="after")
    @classmethod
    def _keep_default_budgets(cls, value: dict[str, Budget]) -> dict[str, Budget]:
        defaults = {k: Budget(**v) for k, v in DEFAULT_BUDGETS.items()}
        return {**defaults, **value}

    @field_validator("media_allow_private_networks", mode="after")
    @classmethod
    def _networks_parse(cls, value: list[str]) -> list[str]:
        """A typo in a CIDR must fail at start-up, not open or close a door at fetch time."""
        import ipaddress

        for net in value:
            ipaddress.ip_network(net, strict=False)
        return value

    @field_validator("media_allowed_hosts", mode="after")
    @classmethod
    def _hosts_lower(cls, value: list[str]) -> list[str]:
        out = [h.strip().lower().rstrip(".") for h in value]
        bad = [h for h in out if not h or h == "*" or "*" in h[1:] or
               (h.startswith("*") and not h.startswith("*."))]
        if bad:
            raise ValueError(f"media_allowed_hosts: {bad} are not host names or '*.suffix'")
        return out

    @field_validator("broker_url", mode="after")
    @classmethod
    def _broker_url_parses(cls, value: str) -> str:
        """A malformed URL (a stray comma in the host list, a port out of range) must fail
        at start-up, not as a reconnect loop that can never succeed."""
        BrokerUrl.parse(value)
        return value

    def budget(self, task_type: str) -> Budget:
        return self.budgets.get(task_type, Budget())

    def tuning(self, queue: str) -> QueueTuning:
        return self.queues.get(queue, QueueTuning())

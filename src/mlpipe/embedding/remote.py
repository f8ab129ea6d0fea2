"""The API backend: OpenAI-compatible ``/v1/embeddings``, one request per micro-batch.

Errors are mapped by ``mlpipe.backends.api_errors`` (rate limits and 5xx transient, other 4xx
permanent); the SDK's own retries are off, the daemon's backoff does that job.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from mlpipe.backends import api_errors, make_client
from mlpipe.errors import TransientError
from mlpipe.settings import Settings

from .backend import BatchOutput

if TYPE_CHECKING:
    import openai


class ApiEmbedder:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.default_model = settings.embed_api_model
        self._client: openai.AsyncOpenAI | None = None

    async def __call__(self, texts: Sequence[str], model: str) -> BatchOutput:
        if self._client is None:  # lazily: a daemon that never embeds via the API needs none
            self._client = make_client(self._settings)
        async with api_errors(f"embeddings ({model})"):
            response = await self._client.embeddings.create(model=model, input=list(texts))
        data = sorted(response.data, key=lambda d: d.index)
        if len(data) != len(texts):
            raise TransientError(f"embeddings ({model}): {len(data)} vectors for {len(texts)} "
                                 "inputs", reason="api_bad_response")
        import numpy as np

        vectors = [np.asarray(d.embedding, dtype=np.float32) for d in data]
        tokens = response.usage.prompt_tokens if response.usage is not None else None
        return BatchOutput(vectors=vectors, tokens=tokens)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

"""The API backend: OpenAI-compatible ``/v1/embeddings``, one request per micro-batch.

Errors are mapped by ``mlpipe.backends.api_errors`` (rate limits and 5xx transient, other 4xx
permanent); the SDK's own retries are off, the daemon's backoff does that job.
"""

from __future__ import annotations

from collections.abc import Sequence

from mlpipe.backends import LazyClient, api_errors
from mlpipe.errors import TransientError
from mlpipe.settings import Settings

from .backend import BatchOutput


class ApiEmbedder:
    def __init__(self, settings: Settings) -> None:
        self.default_model = settings.embed_api_model
        # made on the first call: a daemon that never embeds via the API needs none
        self._client = LazyClient(settings)

    async def __call__(self, texts: Sequence[str], model: str) -> BatchOutput:
        async with api_errors(f"embeddings ({model})"):
            response = await self._client.get().embeddings.create(model=model,
                                                                  input=list(texts))
        data = sorted(response.data, key=lambda d: d.index)
        if len(data) != len(texts):
            raise TransientError(f"embeddings ({model}): {len(data)} vectors for {len(texts)} "
                                 "inputs", reason="api_bad_response")
        import numpy as np

        vectors = [np.asarray(d.embedding, dtype=np.float32) for d in data]
        tokens = response.usage.prompt_tokens if response.usage is not None else None
        return BatchOutput(vectors=vectors, tokens=tokens)

    async def aclose(self) -> None:
        await self._client.aclose()

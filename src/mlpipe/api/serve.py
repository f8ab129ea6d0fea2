"""``mlpipe serve``: the read API as a process of its own (``mlpipe.cli.contracts`` parses its
arguments).

Query texts must be embedded with the model the stored vectors were made with, chosen as the
embed handler chooses it: the OpenAI-compatible API when ``MLPIPE_OPENAI_API_KEY`` or a
self-hosted server's ``MLPIPE_OPENAI_BASE_URL`` is set (``--backend`` overrides), else the
local all-MiniLM-L6-v2 from ``MLPIPE_EMBEDDING_MODEL_DIR``, which works offline. Concurrent
requests share one micro-batching ``Batcher``, as the embed handler does, so the local model
runs one inference at a time. The local model is loaded before the port opens: a missing
model is a start-up error, not a 503 on the first search.

Stops on SIGTERM/SIGINT (requests in flight get a few seconds to finish) with exit code 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from collections.abc import Sequence

from mlpipe.search import VectorLike
from mlpipe.settings import Settings

from .server import ApiConfig, ApiServer

EXIT_OK = 0


async def cmd_serve(args: argparse.Namespace) -> int:
    from mlpipe.embedding.batcher import Batcher
    from mlpipe.embedding.local import LocalEmbedder, model_files
    from mlpipe.embedding.searcher import query_backend

    settings = Settings()
    # chosen as the embed handler chooses: queries meet vectors of their own model
    backend = query_backend(settings, getattr(args, "backend", None))
    use_api = not isinstance(backend, LocalEmbedder)
    if not use_api:
        model_files(settings.embedding_model_dir)  # a clear error now, not a 503 per request
    model = backend.default_model
    config = ApiConfig.from_settings(settings, host=getattr(args, "host", None),
                                     port=getattr(args, "port", None), search_model=model)
    async with Batcher(backend, max_batch=settings.embed_batch_size,
                       max_wait_s=settings.embed_batch_wait_ms / 1000,
                       max_concurrent_calls=4 if use_api else 1, name="api.embed") as batcher:

        async def embed(texts: list[str]) -> Sequence[VectorLike]:
            return await batcher.embed(texts, model=model)

        if not use_api:
            await embed(["warm-up"])  # loads the model before the port opens
        async with ApiServer(config, embedder=embed) as server:
            print(json.dumps({"listening": server.url, "model": model}), flush=True)
            await _until_signalled()
    return EXIT_OK


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)

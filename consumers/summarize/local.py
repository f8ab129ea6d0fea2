"""The offline backend: extractive summaries, no API key, no model files, no cost."""

from __future__ import annotations

import asyncio

from . import extractive
from .outcome import Summary
from .preflight import Tokenizer
from .source import Source, fit
from .tokens import Tokenizers

#: The extractive summariser has no context limit of its own; this bounds its work (the
#: similarity graph grows with the square of the sentences) at roughly 12 000 words, more than a
#: 30-minute transcript.
CONTEXT_TOKENS = 16_384


async def summarize(source: Source, max_tokens: int, tokenizers: Tokenizers) -> Summary:
    """CPU-bound pure Python: run in a thread so the event loop keeps serving the broker."""
    tokenizer = await tokenizers.for_model_async(extractive.MODEL_NAME)
    return await asyncio.to_thread(summarize_sync, source, max_tokens, tokenizer)


def summarize_sync(source: Source, max_tokens: int, tokenizer: Tokenizer) -> Summary:
    fitted = fit(source, CONTEXT_TOKENS - max_tokens, tokenizer)
    s = fitted.source
    # Caption before transcript, a paragraph apart so no sentence spans the two.
    text = "\n\n".join(part for part in (s.caption, s.body) if part)
    topic = [s.title or "", *(extractive.hashtag_words(t) for t in s.hashtags)]
    extract = extractive.summarize(text, max_tokens, tokenizer, topic_terms=topic)
    return Summary(summary=extract.summary, model=extractive.MODEL_NAME, backend="local",
                   input_tokens=tokenizer.count(text), output_tokens=extract.tokens,
                   truncated=fitted.truncated, model_version=extractive.MODEL_VERSION)

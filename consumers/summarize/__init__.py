"""Summaries of articles and of videos (transcript + caption + hashtags).

Two backends: an OpenAI-compatible chat model (``MLPIPE_OPENAI_API_KEY`` set: paid, budgeted;
or a self-hosted server at ``MLPIPE_OPENAI_BASE_URL`` with no key: free unless priced in
``MLPIPE_OPENAI_PRICES``) and an offline extractive summariser (no key, no model files).
Content is refused before any spend when it is binary or too short, and cut at sentence
boundaries to the model's context.

    from consumers import summarize
    summarize.register(registry, settings)
"""

from __future__ import annotations

from .handlers import DEFAULT_MAX_LENGTH, api_model, register

__all__ = ["DEFAULT_MAX_LENGTH", "api_model", "register"]

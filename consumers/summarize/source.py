"""What gets summarised, for both task types, and how it is fitted into a token budget.

An article and a video differ only in the short context that frames the main text (a title;
a caption and hashtags), so both become one ``Source`` and every backend handles one shape.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mlpipe.contract.models import SummarizePayload, SummarizeVideoCombinedPayload

from .preflight import Tokenizer, check_content, check_not_binary, truncate_to_budget

#: Shares of the budget the framing may take before the main text gets the rest, so that a
#: 100 000-character caption or a thousand hashtags cannot crowd out the transcript.
CAPTION_SHARE = 4
HASHTAGS_SHARE = 16


@dataclass(frozen=True)
class Source:
    #: The article text or the transcript.
    body: str
    #: ``article``, ``transcript``, ``video``...: tells the model what it is reading.
    kind: str
    title: str | None = None
    caption: str | None = None
    hashtags: tuple[str, ...] = ()

    @property
    def hashtag_line(self) -> str:
        return " ".join(t if t.startswith("#") else f"#{t}" for t in self.hashtags)


@dataclass(frozen=True)
class Fitted:
    source: Source
    truncated: bool


def article_source(payload: SummarizePayload) -> Source:
    """Validated for content (binary, length) before anything is spent on it."""
    content = payload.content
    check_content(content.text)
    kind = content.type.value if content.type is not None else "text"
    return Source(body=content.text, kind=kind, title=content.title)


def video_source(payload: SummarizeVideoCombinedPayload) -> Source:
    """Transcript and caption are checked for binary junk each, and for length together: a
    silent video with a good caption is still worth a summary."""
    transcript = payload.transcript.text
    check_not_binary(transcript, what="transcript")
    if payload.caption:
        check_not_binary(payload.caption, what="caption")
    check_content(f"{payload.caption or ''}\n\n{transcript}", what="transcript and caption")
    hashtags = tuple(t.strip() for t in payload.hashtags if t.strip().lstrip("#"))
    return Source(body=transcript, kind="video", title=payload.transcript.title,
                  caption=payload.caption or None, hashtags=hashtags)


def fit(source: Source, budget: int, tokenizer: Tokenizer) -> Fitted:
    """Cut the source to ``budget`` tokens in total: title, caption and hashtags first, each
    within its share, then the main text to whatever is left, at sentence (or word)
    boundaries."""
    truncated = False
    title, caption, hashtags = source.title, source.caption, source.hashtags
    remaining = budget
    if title:
        cut_title = tokenizer.head(title, max(1, budget // HASHTAGS_SHARE))
        title, truncated = cut_title, cut_title != title
        remaining -= tokenizer.count(title)
    if caption:
        cut = truncate_to_budget(caption, max(1, budget // CAPTION_SHARE), tokenizer)
        caption, truncated = cut.text, truncated or cut.truncated
        remaining -= cut.tokens
    if hashtags:
        allowed = max(1, budget // HASHTAGS_SHARE)
        kept: list[str] = []
        for tag, n in zip(hashtags, tokenizer.count_many([f" {t}" for t in hashtags]),
                          strict=True):
            if n > allowed:
                truncated = True
                break
            kept.append(tag)
            allowed -= n
            remaining -= n
        hashtags = tuple(kept)
    if remaining <= 0:
        raise ValueError(f"budget of {budget} tokens leaves nothing for the text")
    body = truncate_to_budget(source.body, remaining, tokenizer)
    fitted = replace(source, body=body.text, title=title, caption=caption, hashtags=hashtags)
    return Fitted(fitted, truncated or body.truncated)

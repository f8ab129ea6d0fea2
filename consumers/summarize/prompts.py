"""The chat messages sent to the API backend, and what they cost in tokens before any text.

The length limit is stated in the instructions as well as enforced with ``max_tokens``: a
model told only by ``max_tokens`` stops mid-sentence; told in words (about 3/4 of a token
each) it plans a summary that ends where it should.
"""

from __future__ import annotations

from openai.types.chat import ChatCompletionMessageParam

from .preflight import Tokenizer
from .source import Source

#: Chat framing per message (role, separators) and for priming the reply, as OpenAI counts it.
TOKENS_PER_MESSAGE = 4
TOKENS_PER_REPLY = 3
WORDS_PER_TOKEN = 0.75

_SYSTEM = (
    "You summarise the {what} in the user's message. Write one concise summary of at most about "
    "{words} words, in the language of the {what}. Keep the main points, names and numbers "
    "exactly as given; add nothing that is not in the {what}. Reply with the summary only."
)
#: ``Source.kind`` -> the noun the instructions use.
_WHAT = {"video": "video", "transcript": "transcript", "caption": "caption",
         "article": "article", "comment": "comment", "tweet": "post"}


def messages(source: Source, max_tokens: int) -> list[ChatCompletionMessageParam]:
    system = _SYSTEM.format(what=_WHAT.get(source.kind, "text"),
                            words=max(5, int(max_tokens * WORDS_PER_TOKEN)))
    if source.kind == "video":
        system += (" You get the video's caption, hashtags and transcript; combine them into "
                   "one summary of what the video is about. Do not list the hashtags.")
    return [{"role": "system", "content": system},
            {"role": "user", "content": user_content(source)}]


def user_content(source: Source) -> str:
    parts: list[str] = []
    if source.title:
        parts.append(f"Title: {source.title}")
    if source.caption:
        parts.append(f"Caption:\n{source.caption}")
    if source.hashtags:
        parts.append(f"Hashtags: {source.hashtag_line}")
    parts.append(f"Transcript:\n{source.body}" if source.kind == "video" else source.body)
    return "\n\n".join(parts)


def prompt_tokens(msgs: list[ChatCompletionMessageParam], tokenizer: Tokenizer) -> int:
    return TOKENS_PER_REPLY + sum(TOKENS_PER_MESSAGE + tokenizer.count(str(m.get("content", "")))
                                  for m in msgs)


def overhead_tokens(source: Source, max_tokens: int, tokenizer: Tokenizer) -> int:
    """Tokens of the prompt around the (yet unfitted) text: instructions, labels, framing."""
    bare = Source(body="", kind=source.kind, title="x" if source.title else None,
                  caption="x" if source.caption else None,
                  hashtags=("x",) if source.hashtags else ())
    return prompt_tokens(messages(bare, max_tokens), tokenizer)

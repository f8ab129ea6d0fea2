"""Checks and cuts applied to content before any summariser (or any money) touches it.

Pure functions so they are unit-tested without services and run identically in the cost
estimator (before the budget is reserved) and in the handler. Refusals are permanent: the same
bytes will never become summarisable by retrying.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from mlpipe.errors import PermanentError

from .sentences import sentence_spans

MIN_CHARS = 50
MIN_WORDS = 10
#: Share of control, replacement, surrogate or private-use characters above which the text is
#: taken for binary data decoded as text. Real text has a handful at most (a form feed per PDF
#: page); random bytes decoded as UTF-8 or Latin-1 give 25 % and more.
MAX_JUNK_RATIO = 0.10
#: Text past the cut that sentence detection may look at (the word after a full stop decides
#: whether it ended a sentence).
_LOOKAHEAD_CHARS = 200
#: Sentences to step back over when a prefix's own count exceeds the budget (BPE merges at the
#: cut); more than one or two never happens, this only bounds the work.
_MAX_STEP_BACK = 8

#: Characters no human-written text is made of: C0/C1 controls except tab, newline, carriage
#: return and form feed, U+FFFD (what a failed decode leaves), lone surrogates (surrogateescape),
#: private-use code points and noncharacters.
_JUNK = re.compile(
    "[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f\ufffd\ud800-\udfff\ue000-\uf8ff\ufff0-\ufffc\ufffe\uffff]"
)
#: Scripts written without spaces between words (Chinese, Japanese): each character counts as
#: a word, as word counts for them conventionally do.
_UNSPACED = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
#: A word: a run of letters or digits, inner apostrophes and hyphens allowed ("don't",
#: "state-of-the-art"), or one character of an unspaced script. Punctuation runs such as
#: "---" are not words.
_WORD = re.compile(
    rf"[{_UNSPACED}]|[^\W_{_UNSPACED}]+(?:['\u2019-][^\W_{_UNSPACED}]+)*"
)


class Tokenizer(Protocol):
    """What truncation needs from a tokenizer (the offline tiktoken one in production)."""

    def count(self, text: str) -> int: ...

    def count_many(self, texts: list[str]) -> list[int]: ...

    def head(self, text: str, max_tokens: int) -> str:
        """The longest prefix of ``text`` of at most ``max_tokens`` tokens, cut at whitespace
        where there is any."""
        ...


@dataclass(frozen=True)
class Truncated:
    text: str
    tokens: int
    truncated: bool


def word_count(text: str) -> int:
    return sum(1 for _ in _WORD.finditer(text))


def junk_ratio(text: str) -> float:
    return len(_JUNK.findall(text)) / len(text) if text else 0.0


def check_not_binary(text: str, *, what: str = "content") -> None:
    """Raise ``PermanentError(reason="binary_content")`` for binary data sent as text."""
    if "\x00" in text:
        raise PermanentError(f"{what} contains NUL characters: binary data, not text",
                             reason="binary_content")
    ratio = junk_ratio(text)
    if ratio > MAX_JUNK_RATIO:
        raise PermanentError(
            f"{what} is {ratio:.0%} control, replacement or private-use characters "
            f"(more than {MAX_JUNK_RATIO:.0%}): binary data decoded as text, not text",
            reason="binary_content")


def check_long_enough(text: str, *, what: str = "content") -> None:
    """Raise ``PermanentError(reason="content_too_short")`` below 50 characters or 10 words:
    there is nothing to condense, and a model asked to would pad or invent."""
    chars = len(" ".join(text.split()))
    words = word_count(text)
    if chars < MIN_CHARS or words < MIN_WORDS:
        raise PermanentError(
            f"{what} is too short to summarise: {chars} characters and {words} words "
            f"(whitespace collapsed); at least {MIN_CHARS} characters and {MIN_WORDS} words "
            "are needed", reason="content_too_short")


def check_content(text: str, *, what: str = "content") -> None:
    """Binary first: junk that happens to be short is better reported as what it is."""
    check_not_binary(text, what=what)
    check_long_enough(text, what=what)


def truncate_to_budget(text: str, budget: int, tokenizer: Tokenizer) -> Truncated:
    """Cut ``text`` to at most ``budget`` tokens at the last sentence boundary that fits.

    Only when not even the first sentence fits (an unpunctuated transcript) is the cut made at
    a word boundary inside it. The sentence search is confined to the budget's worth of text
    (plus a little lookahead, so "approx. five" at the edge is still read as one sentence),
    never the whole of a two-million-character input. BPE merges across the cut can shift a
    count by a token, so the chosen prefix is counted again and stepped back if it is over.
    """
    if budget <= 0:
        raise ValueError(f"token budget must be positive, got {budget}")
    total = tokenizer.count(text)
    if total <= budget:
        return Truncated(text, total, False)
    head = tokenizer.head(text, budget).rstrip()
    window = text[:len(head) + _LOOKAHEAD_CHARS]
    ends = [end for _, end in sentence_spans(window) if end <= len(head)]
    for end in reversed(ends[-_MAX_STEP_BACK:]):
        tokens = tokenizer.count(text[:end])
        if tokens <= budget:
            return Truncated(text[:end], tokens, True)
    return Truncated(head, tokenizer.count(head), True)

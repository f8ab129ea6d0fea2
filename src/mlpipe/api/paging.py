"""Pages over a nearest-neighbour ranking.

``mlpipe.search`` returns the top ``limit`` hits, best first, and nothing beyond; a page at
offset ``o`` is therefore cut from the top ``o + size + 1`` (the extra one says whether a next
page exists). Two things make that less simple than it sounds:

* The HNSW index is approximate and its search width grows with ``limit``, so asking for 13
  and then for 23 hits can rank the shared part differently. Candidate counts are rounded up
  to a few fixed rungs, so consecutive pages usually come from the same ranking.
* The time filter (``from``/``to``, on when a chunk was embedded) is applied here, after the
  ranking, because the search functions take no time bounds. With it, more candidates are
  fetched, and the rungs are climbed until the page is full or the ranking is exhausted. A
  ranking is at most ``MAX_LIMIT`` hits deep: past that the listing ends.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from mlpipe.search import MAX_LIMIT, Hit

from .queries import ChunkKey

#: Top-``k`` hits of the ranking.
Fetch = Callable[[int], Awaitable[list[Hit]]]
#: When each hit's chunk was embedded; a hit missing from the answer was replaced meanwhile.
Stamps = Callable[[list[Hit]], Awaitable[dict[ChunkKey, dt.datetime]]]

_RUNGS = (25, 100, 250, MAX_LIMIT)
#: Candidates fetched per wanted hit when a time filter will drop some.
_FILTERED_OVERFETCH = 4


@dataclass(frozen=True)
class TimedHit:
    hit: Hit
    indexed_at: dt.datetime


@dataclass(frozen=True)
class HitSlice:
    items: list[TimedHit]
    #: A next page exists.
    more: bool


def key(hit: Hit) -> ChunkKey:
    return hit.share_id, hit.embedding_type, hit.chunk_index


async def hit_slice(fetch: Fetch, stamps: Stamps, *, offset: int, size: int,
                    start: dt.datetime | None, end: dt.datetime | None) -> HitSlice:
    need = offset + size + 1
    ranged = start is not None or end is not None
    k = _rung(need * _FILTERED_OVERFETCH if ranged else need)
    while True:
        hits = await fetch(k)
        times = await stamps(hits)
        kept = [TimedHit(h, times[key(h)]) for h in hits
                if key(h) in times and _within(times[key(h)], start, end)
                # a zero vector has no direction: its cosine is NaN, which JSON cannot carry
                and math.isfinite(h.similarity)]
        if len(kept) >= need or len(hits) < k or k >= MAX_LIMIT:
            return HitSlice(kept[offset:offset + size], len(kept) > offset + size)
        k = _rung(k + 1)


def _rung(n: int) -> int:
    return next((r for r in _RUNGS if r >= n), MAX_LIMIT)


def _within(at: dt.datetime, start: dt.datetime | None, end: dt.datetime | None) -> bool:
    return (start is None or at >= start) and (end is None or at < end)

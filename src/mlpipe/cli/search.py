"""``mlpipe search``: similarity search from the command line.

    mlpipe search "how do rockets reach orbit" [--limit 5] [--platform youtube] [--type transcript]
    mlpipe search "the part about fuel" --share SHARE     # within one share (timestamps shown)
    mlpipe search --share SHARE                           # shares similar to SHARE
    mlpipe search "launch news" --since 2024-05-01 --until 2024-05-08   # embedded that week

The query is embedded with the model the stored vectors were made with: the API model when
``MLPIPE_OPENAI_API_KEY`` or ``MLPIPE_OPENAI_BASE_URL`` is set, else the local one
(``--backend``/``--model`` override).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import sys
from typing import TYPE_CHECKING

from mlpipe.contract.models import ContentType, EmbeddingType
from mlpipe.settings import Settings

from .common import Add

if TYPE_CHECKING:  # the heavy imports wait for a search: `mlpipe --help` stays quick
    from mlpipe.search import Hit

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
SNIPPET = 160


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments ``run_search`` reads."""
    parser.add_argument("query", nargs="?",
                        help="text to search for; leave out (with --share) for similar shares")
    parser.add_argument("--share", help="with a query: search this share only; "
                                        "without: find shares similar to it")
    parser.add_argument("--limit", type=int, default=10, help="hits to show (default 10)")
    parser.add_argument("--platform", help="only content from this platform")
    parser.add_argument("--type", dest="content_type", choices=[c.value for c in ContentType],
                        help="only this content type")
    parser.add_argument("--embedding-type", choices=[e.value for e in EmbeddingType],
                        help="only this embedding type (default: any; similar shares: content)")
    parser.add_argument("--since", type=_instant, metavar="TIME",
                        help="only chunks embedded at or after TIME (ISO 8601 date or date-time; "
                             "local time unless it has an offset)")
    parser.add_argument("--until", type=_instant, metavar="TIME",
                        help="only chunks embedded before TIME")
    parser.add_argument("--backend", choices=["api", "local"],
                        help="model family the vectors were made with (default: api when an "
                             "API key or a self-hosted server's base URL is configured, else "
                             "local)")
    parser.add_argument("--model", help="model name as stored (overrides --backend's default)")
    parser.add_argument("--json", action="store_true", help="hits as a JSON array")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlpipe search", description=__doc__.splitlines()[0])
    add_search_arguments(parser)
    return parser


async def run_search(args: argparse.Namespace, settings: Settings | None = None) -> int:
    from mlpipe.embedding.searcher import Searcher
    from mlpipe.search import ShareNotEmbedded

    query: str | None = getattr(args, "query", None)
    share: str | None = getattr(args, "share", None)
    limit: int = getattr(args, "limit", 10)
    if not query and not share:
        print("mlpipe search: give a query text, --share SHARE, or both", file=sys.stderr)
        return EXIT_USAGE
    if not 1 <= limit <= 1000:
        print("mlpipe search: --limit must be between 1 and 1000", file=sys.stderr)
        return EXIT_USAGE
    platform = getattr(args, "platform", None)
    content_type = getattr(args, "content_type", None) or getattr(args, "type", None)
    embedding_type = getattr(args, "embedding_type", None)
    bounds = {"since": getattr(args, "since", None), "until": getattr(args, "until", None)}
    try:
        async with Searcher(settings, backend=getattr(args, "backend", None),
                            model=getattr(args, "model", None), pool_size=1) as searcher:
            if query:
                hits = await searcher.search(query, limit=limit, share_id=share,
                                             platform=platform, content_type=content_type,
                                             embedding_type=embedding_type, **bounds)
            else:
                assert share is not None
                hits = await searcher.similar(share, limit=limit,
                                              embedding_type=embedding_type or "content",
                                              platform=platform, content_type=content_type,
                                              **bounds)
    except ShareNotEmbedded as exc:
        print(f"mlpipe search: {exc.args[0]}", file=sys.stderr)
        return EXIT_ERROR
    _print(hits, as_json=bool(getattr(args, "json", False)))
    return EXIT_OK


def _print(hits: list[Hit], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps([dataclasses.asdict(h) for h in hits], ensure_ascii=False,
                         default=_iso))
        return
    if not hits:
        print("no matches")
    for hit in hits:
        when = f" [{_clock(hit.start_s)}-{_clock(hit.end_s)}]" if hit.start_s is not None else ""
        text = " ".join(hit.chunk_text.split())
        text = text if len(text) <= SNIPPET else text[:SNIPPET - 1] + "…"
        title = hit.metadata.get("title")
        print(f"{hit.similarity:.3f}  {hit.share_id}#{hit.chunk_index}{when}"
              + (f"  {title}" if title else ""))
        print(f"       {text}")


def _instant(text: str) -> dt.datetime:
    """A bound as typed on a command line: a date means its midnight, and a time without an
    offset is the user's local time (the library refuses naive datetimes)."""
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 date or date-time") from exc
    return value if value.tzinfo is not None else value.astimezone()


def _iso(value: object) -> str:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _clock(seconds: float | None) -> str:
    total = int(seconds or 0)
    hours, rest = divmod(total, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


async def cmd_search(args: argparse.Namespace) -> int:
    from .common import settings_from

    return await run_search(args, settings_from(args))


def register(add: Add) -> None:
    add_search_arguments(add("search", cmd_search, "similarity search over the stored chunks: "
                                                   "share ids, chunk text, timestamps, score"))

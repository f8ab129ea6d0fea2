"""``mlpipe`` command line: the parser, and the one place a command's errors become exit codes.

Exit codes: 0 clean stop (signal or finished command), 1 error, 2 usage error,
3 worker recycled (max tasks or RSS; Kubernetes starts a fresh one), 130 forced by a second
signal.

Commands live in modules by what they are for: ``work`` (consume, publish), ``ops`` (topology,
check, dlq, migrate, costs, workflow), ``search``, ``contracts`` (serve and the documents).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from mlpipe.errors import MlpipeError

from . import contracts, ops, search, work
from .common import (
    EXIT_ERROR,
    EXIT_FORCED,
    EXIT_OK,
    EXIT_RECYCLED,
    EXIT_USAGE,
    Command,
)
from .work import DEFAULT_HANDLERS, load_registry

__all__ = ["DEFAULT_HANDLERS", "EXIT_ERROR", "EXIT_FORCED", "EXIT_OK", "EXIT_RECYCLED",
           "EXIT_USAGE", "load_registry", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    from mlpipe.logs import configure

    configure(json=args.log_json, level=args.log_level)
    try:
        code: int = _run(args.func(args))
    except MlpipeError as exc:
        print(f"mlpipe: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except ValueError as exc:
        print(f"mlpipe: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return code


def _run(coro: Coroutine[Any, Any, int]) -> int:
    """On uvloop where it is installed. Only its import is guarded: an ImportError raised by
    the command itself must surface as that error."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro)
    return uvloop.run(coro)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlpipe", description=__doc__.splitlines()[0])
    p.add_argument("--log-json", action=argparse.BooleanOptionalAction, default=None,
                   help="JSON log lines (default: when stderr is not a terminal)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--broker-url", help="overrides MLPIPE_BROKER_URL")
    sub = p.add_subparsers(metavar="COMMAND")

    def add(name: str, func: Command, help: str, parent: Any = sub) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = parent.add_parser(name, help=help, description=help)
        sp.set_defaults(func=func)
        return sp

    work.register(add)
    ops.register(add, sub)
    search.register(add)
    contracts.register(add, sub)
    return p

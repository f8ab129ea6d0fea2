"""``python -m mlpipe.api serve|openapi``: the read API's commands before (and besides) their
``mlpipe`` subcommands.

    python -m mlpipe.api serve [--host H] [--port P] [--backend api|local]
    python -m mlpipe.api openapi [contracts/openapi.json] [--check]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from mlpipe.errors import MlpipeError

DEFAULT_OPENAPI_PATH = Path("contracts") / "openapi.json"


def main(argv: Sequence[str] | None = None) -> int:
    from mlpipe.api.cli import add_serve_arguments

    parser = argparse.ArgumentParser(prog="python -m mlpipe.api")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_arguments(sub.add_parser("serve", help="run the read API"))
    gen = sub.add_parser("openapi", help="write the OpenAPI document")
    gen.add_argument("path", nargs="?", default=str(DEFAULT_OPENAPI_PATH))
    gen.add_argument("--check", action="store_true",
                     help="exit 1 if the file differs from the generated document")
    args = parser.parse_args(argv)
    if args.command == "openapi":
        return write_openapi(Path(args.path), check=args.check)
    return serve(args)


def serve(args: argparse.Namespace) -> int:
    from mlpipe.api.cli import cmd_serve
    from mlpipe.logs import configure

    configure()
    try:
        return asyncio.run(cmd_serve(args))
    except MlpipeError as exc:
        print(f"mlpipe: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def write_openapi(path: Path, *, check: bool) -> int:
    from mlpipe.api.openapi import document, render

    text = render(document())
    if check:
        current = path.read_text(encoding="utf-8") if path.is_file() else ""
        if current != text:
            print(f"{path} is out of date: run python -m mlpipe.api openapi {path}",
                  file=sys.stderr)
            return 1
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m mlpipe.api openapi [PATH] [--check]``: (re)write or check the checked-in OpenAPI
document (also ``mlpipe contract openapi``). The server itself is ``mlpipe serve``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_OPENAPI_PATH = Path("contracts") / "openapi.json"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlpipe.api")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("openapi", help="write the OpenAPI document")
    gen.add_argument("path", nargs="?", default=str(DEFAULT_OPENAPI_PATH))
    gen.add_argument("--check", action="store_true",
                     help="exit 1 if the file differs from the generated document")
    args = parser.parse_args(argv)
    return write_openapi(Path(args.path), check=args.check)


def write_openapi(path: Path, *, check: bool) -> int:
    from mlpipe.api.app import contract
    from mlpipe.api.docs import render
    from mlpipe.contract.files import write_or_check

    return write_or_check(path, render(contract()), check=check,
                          regenerate="mlpipe contract openapi")


if __name__ == "__main__":
    sys.exit(main())

"""Documents other teams build against: the JSON Schemas, OpenAPI and AsyncAPI; and the read
API that serves the OpenAPI one (``serve``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import EXIT_OK, Add


async def cmd_contract_export(args: argparse.Namespace) -> int:
    from mlpipe.contract.schema import export

    for path in export(Path(args.dir)):
        print(path)
    return EXIT_OK


async def cmd_contract_asyncapi(args: argparse.Namespace) -> int:
    from mlpipe.contract.asyncapi import write

    return write(Path(args.path), check=args.check)


async def cmd_serve(args: argparse.Namespace) -> int:
    from mlpipe.api.serve import cmd_serve as serve

    return await serve(args)


async def cmd_contract_openapi(args: argparse.Namespace) -> int:
    from mlpipe.api.__main__ import write_openapi

    return write_openapi(Path(args.path), check=args.check)


def register(add: Add, sub: Any) -> None:
    se = add("serve", cmd_serve, "the read API: search, results, workflow state and (admin "
                                 "token) cost analytics over HTTP")
    se.add_argument("--host", help="address to listen on (default: MLPIPE_API_HOST, "
                                   "127.0.0.1); other than loopback needs API tokens")
    se.add_argument("--port", type=int, help="default: MLPIPE_API_PORT, 8080; 0 picks one")
    se.add_argument("--backend", choices=["api", "local"],
                    help="how query texts are embedded (default: api when an API key or a "
                         "self-hosted server's base URL is configured, else the local model)")

    con = sub.add_parser("contract", help="contract v1 tools")
    csub = con.add_subparsers(metavar="ACTION")
    ce = add("export", cmd_contract_export, "write the JSON Schema files", csub)
    ce.add_argument("--dir", default="contracts")
    cop = add("openapi", cmd_contract_openapi, "write the read API's OpenAPI document", csub)
    cop.add_argument("path", nargs="?", default="contracts/openapi.json")
    cop.add_argument("--check", action="store_true",
                     help="exit 1 if the file differs from the generated document")
    cap = add("asyncapi", cmd_contract_asyncapi,
              "write the AsyncAPI 3.0 document of the broker topology", csub)
    cap.add_argument("path", nargs="?", default="contracts/asyncapi.json")
    cap.add_argument("--check", action="store_true",
                     help="exit 1 if the file differs from the generated document")

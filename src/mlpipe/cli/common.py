"""What every command shares: exit codes, how a command is registered, settings from flags."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_RECYCLED, EXIT_FORCED = 0, 1, 2, 3, 130

Command = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]


class Add(Protocol):
    """Adds a subcommand running ``func`` under ``parent`` (the top level by default)."""

    def __call__(self, name: str, func: Command, help: str,
                 parent: Any = ...) -> argparse.ArgumentParser: ...


def settings_from(args: argparse.Namespace) -> Any:
    """``Settings()`` from the environment, with the global ``--broker-url`` on top."""
    from mlpipe.settings import Settings

    overrides = {}
    if getattr(args, "broker_url", None):
        overrides["broker_url"] = args.broker_url
    return Settings(**overrides)

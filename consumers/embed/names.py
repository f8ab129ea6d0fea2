"""Names of the embed resources in ``ctx.resources`` (and ``daemon.resources``).

Kept apart from the handler so that reaching a batcher by name (benchmarks, tests, the command
line) does not import the API client or the model runtime.
"""

from __future__ import annotations

LOCAL_BATCHER = "embed.batcher.local"
API_BATCHER = "embed.batcher.api"
STORE = "embed.store"

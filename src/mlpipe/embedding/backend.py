"""What an embedding backend is to the batcher: texts in, one vector per text out.

Backends know nothing about deliveries; the batcher feeds them texts gathered from many
concurrent handler runs, so one call serves many tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeAlias

if TYPE_CHECKING:  # numpy is imported by the backends that make vectors, when they make them
    import numpy as np
    import numpy.typing as npt

#: One embedding, 1-D float32 (what pgvector's asyncpg codec writes without a copy).
Vector: TypeAlias = "npt.NDArray[np.float32]"


@dataclass(frozen=True)
class BatchOutput:
    vectors: list[Vector]
    #: Input tokens the provider billed for the whole call; None when it is free (local).
    tokens: int | None


class EmbedBackend(Protocol):
    #: Model used when a request names none.
    default_model: str

    async def __call__(self, texts: Sequence[str], model: str) -> BatchOutput: ...

    async def aclose(self) -> None: ...


def approx_tokens(text: str) -> int:
    """One token per started four characters of each word: close to what BPE tokenizers count
    for English prose (``consumers.embed.chunking`` explains the choice), and free to compute,
    which matters to the batcher's size accounting and the cost estimates."""
    return sum((len(word) + 3) // 4 for word in text.split())

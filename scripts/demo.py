"""`make demo`: the whole pipeline, offline, as a user would run it.

1. espeak-ng speaks a short clip; a few article texts are written out below;
2. ``mlpipe consume`` starts as a subprocess on the ``*_local`` queues (local Whisper, the
   extractive summariser, local MiniLM embeddings: no API key, nothing downloaded);
3. the clip goes through the video workflow (``submit_video``: caption embedding, transcript,
   combined summary, rich embedding) and each article is summarised and embedded;
   A podcast transcript with timestamps is embedded too (chunked by segment windows);
4. once everything is stored, the transcript, the summaries and a few similarity searches
   (the Python API and ``mlpipe search``) are printed;
5. the daemon is stopped with SIGTERM (it must exit 0), and the demo's queues, exchanges,
   Postgres schema and Redis keys are removed.

Everything lives in a namespace, schema and lock prefix of its own (``demo-<id>``), so the
demo leaves a running deployment alone. ``DEMO_KEEP=1`` keeps the schema to explore with
``MLPIPE_DATABASE_SCHEMA=<schema> mlpipe search ...``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from mlpipe.broker.connection import connect_any
from mlpipe.contract.models import TaskType, build_task
from mlpipe.dlq import list_dead
from mlpipe.logs import configure
from mlpipe.producer import Producer, topology_from
from mlpipe.search import Hit, search
from mlpipe.settings import Settings
from mlpipe.store.migrate import migrate
from mlpipe.workflow import video
from mlpipe.workflow.submit import submit_video

ROOT = Path(__file__).resolve().parents[1]
QUEUES = "transcribe_local,summarize_local,embed_local"
#: Whisper base on two CPU cores takes a few seconds for the clip; the first run also loads
#: both models.
TIMEOUT_S = 300.0
WIDTH = 100

SPOKEN = ("Today I will show you how to make a sourdough starter at home. Mix flour and water "
          "in a jar, keep it warm, and feed it every day. After one week the starter is "
          "bubbly and ready to bake bread.")
VIDEO_SHARE = "demo-video"
CAPTION = "Sourdough starter in 7 days, no yeast needed"
HASHTAGS = ["sourdough", "baking"]
ARTICLES = {
    "demo-rockets": (
        "How rockets reach orbit",
        "A rocket reaches orbit by burning liquid fuel and oxidizer in its engines. Most of "
        "the climb is spent turning sideways, because orbit is about speed rather than "
        "height. At about eight kilometres per second the payload keeps falling around the "
        "Earth instead of back down to it. Engineers stack stages so that empty tanks can be "
        "dropped on the way up."),
    "demo-marathon": (
        "Training for a first marathon",
        "Runners preparing for their first marathon should raise their weekly mileage slowly, "
        "by no more than ten percent a week. One long run every weekend builds endurance, "
        "while easy runs in between let the legs recover. Two weeks before race day the "
        "training tapers off so the body arrives rested."),
    "demo-cats": (
        "Why cats purr",
        "Cats purr by vibrating the muscles of the larynx while they breathe in and out. "
        "Purring usually means a cat is content, for example while it is being stroked. "
        "But cats also purr when they are stressed, hurt or giving birth, which suggests the "
        "sound also helps them calm down."),
}
#: A podcast transcript with timestamps, as a producer that already has one would send it:
#: chunked into 30-60 s windows of segments, so search hits say where to listen.
PODCAST_SHARE = "demo-podcast"
PODCAST = [
    (0, 12, "Welcome back to the weekend show, we have three topics today."),
    (12, 25, "First the weather: heavy rain and thunderstorms are expected on Saturday."),
    (25, 38, "Sunday will be cooler, with strong winds from the north, so bring a coat."),
    (38, 50, "Farmers say the rain comes just in time for the late harvest."),
    (50, 63, "Next, football: the home team won the cup final with a late penalty."),
    (63, 76, "Their striker scored twice and was named player of the match."),
    (76, 90, "The coach said the squad will celebrate with the fans on Monday."),
    (90, 103, "Finally, the city library opens a new reading room for children."),
    (103, 116, "It has comfortable chairs, picture books and story time every afternoon."),
    (116, 125, "That is all for today, see you next week."),
]
QUERIES = ("how do I make bread starter at home",
           "what does a spacecraft need to get into orbit",
           "the sound a happy kitten makes",
           "will it rain this weekend",
           "who scored in the cup final")


@dataclass(frozen=True)
class Demo:
    settings: Settings
    env: dict[str, str]
    workdir: Path
    log_file: Path


async def main() -> int:
    configure(json=False, level=os.environ.get("DEMO_LOG_LEVEL", "WARNING"))
    _check_prerequisites()
    run = uuid.uuid4().hex[:8]
    with tempfile.TemporaryDirectory(prefix="mlpipe-demo-") as tmp:
        base = Settings()
        settings = base.model_copy(update={
            "namespace": f"demo-{run}", "database_schema": f"demo_{run}",
            "lock_prefix": f"mlpipe-demo-{run}:", "media_roots": [tmp]})
        env = {**os.environ, "MLPIPE_NAMESPACE": settings.namespace,
               "MLPIPE_DATABASE_SCHEMA": settings.database_schema,
               "MLPIPE_LOCK_PREFIX": settings.lock_prefix,
               "MLPIPE_MEDIA_ROOTS": json.dumps([tmp]),
               "MLPIPE_DATABASE_URL": settings.database_url,
               "MLPIPE_HTTP_PORT": "0"}
        demo = Demo(settings, env, Path(tmp), Path(tmp) / "daemon.log")
        print(f"demo {run}: namespace {settings.namespace}, schema {settings.database_schema}, "
              "local backends only")
        try:
            await migrate(settings.database_url, schema=settings.database_schema)
            return await _run(demo)
        finally:
            await _cleanup(settings)


async def _run(demo: Demo) -> int:
    settings = demo.settings
    clip = _speak(demo.workdir / "clip.wav")
    async with _daemon(demo) as daemon, Producer(settings) as producer:
        started = time.monotonic()
        await submit_video(producer, VIDEO_SHARE, str(clip), caption=CAPTION,
                           hashtags=HASHTAGS, platform="tiktok", backend="local")
        for share, (title, text) in ARTICLES.items():
            content = {"text": text, "title": title, "platform": "blog", "type": "article"}
            for task_type in (TaskType.SUMMARIZE_LLM, TaskType.EMBED_VECTORS):
                await producer.publish(build_task(task_type, share, {
                    "content": content, "options": {"backend": "local"}}))
        segments = [{"start": a, "end": b, "text": t} for a, b, t in PODCAST]
        await producer.publish(build_task(TaskType.EMBED_VECTORS, PODCAST_SHARE, {
            "content": {"text": " ".join(t for _, _, t in PODCAST), "segments": segments,
                        "type": "transcript", "platform": "podcast"},
            "options": {"backend": "local"}}))
        print(f"published: 1 spoken clip ({clip.stat().st_size // 1024} KiB, video workflow), "
              f"{len(ARTICLES)} articles (summary + embedding each), 1 podcast transcript "
              "(embedding)")
        pool = await asyncpg.create_pool(
            settings.database_url, min_size=1, max_size=2,
            server_settings={"search_path": f"{settings.database_schema}, public"})
        try:
            await _wait_until_done(pool, daemon, settings)
            print(f"everything stored in {time.monotonic() - started:.1f}s\n")
            await _print_results(pool)
            await _print_searches(pool, settings)
        finally:
            await pool.close()
    await _run_search_cli(demo)
    return 0


# --- the daemon -------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _daemon(demo: Demo) -> AsyncIterator[asyncio.subprocess.Process]:
    """``mlpipe consume`` in a subprocess, stopped with SIGTERM; a non-zero exit fails the
    demo, with the daemon's log."""
    argv = ["-m", "mlpipe.cli", "--log-json", "--log-level", "INFO", "consume",
            "--queues", QUEUES]
    print(f"starting: mlpipe consume --queues {QUEUES}")
    with demo.log_file.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *argv, env=demo.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        yield proc
    finally:
        code = await _stop(proc)
        if code != 0:
            _show_log(demo.log_file)
            raise SystemExit(f"the daemon exited {code} instead of 0")
        print(f"daemon stopped (SIGTERM, exit {code})")


async def _stop(proc: asyncio.subprocess.Process) -> int:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(60):
                return await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return -9
    return proc.returncode


def _show_log(path: Path, lines: int = 40) -> None:
    tail = path.read_text(errors="replace").splitlines()[-lines:]
    print("--- last lines of the daemon's log ---", *tail, sep="\n", file=sys.stderr)


async def _wait_until_done(pool: asyncpg.Pool, daemon: asyncio.subprocess.Process,
                           settings: Settings) -> None:
    """Until the video's workflow is final and every article has a summary and vectors; a
    dead letter or a dead daemon ends the wait at once."""
    deadline = time.monotonic() + TIMEOUT_S
    wanted = {(share, t) for share in ARTICLES for t in ("summarize_llm", "embed_vectors")}
    wanted.add((PODCAST_SHARE, "embed_vectors"))
    while True:
        if daemon.returncode is not None:
            raise SystemExit(f"the daemon exited early ({daemon.returncode})")
        dead = await list_dead(settings)
        if dead:
            for entry in dead:
                print(f"dead-lettered {entry.task_type} {entry.share_id}: {entry.reason} "
                      f"({entry.error})", file=sys.stderr)
            raise SystemExit("a task was dead-lettered")
        status = await video.status(pool, VIDEO_SHARE)
        rows = await pool.fetch("SELECT share_id, task_type FROM ml_results")
        if status is not None and status.state in video.FINAL and wanted <= {
                (r["share_id"], r["task_type"]) for r in rows}:
            if status.state != video.State.COMPLETED:
                raise SystemExit(f"the video workflow ended in {status.state}")
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"not done after {TIMEOUT_S:.0f}s: workflow "
                             f"{status.state if status else 'not started'}, results {rows}")
        await asyncio.sleep(0.5)


# --- output -----------------------------------------------------------------------------------


async def _print_results(pool: asyncpg.Pool) -> None:
    rows = {(r["share_id"], r["task_type"]): r["result_data"] for r in await pool.fetch(
        "SELECT share_id, task_type, result_data::text AS result_data FROM ml_results")}
    transcript = json.loads(rows[(VIDEO_SHARE, "transcribe_whisper")])
    print(f"== transcript of {VIDEO_SHARE} ({transcript['model']}, "
          f"{transcript['language']}, {transcript['duration']:.1f}s)")
    for seg in transcript["segments"]:
        print(f"  [{seg['start']:5.1f}-{seg['end']:5.1f}] {seg['text'].strip()}")
    status = await video.status(pool, VIDEO_SHARE)
    assert status is not None
    history = json.loads(status.history) if isinstance(status.history, str) else status.history
    print("  workflow: " + " -> ".join(h["state"] for h in history))
    print("\n== summaries")
    for (share, task_type), raw in sorted(rows.items()):
        if task_type.startswith("summarize"):
            data = json.loads(raw)
            print(f"  {share} ({task_type}, {data['model']}):")
            print(textwrap.indent(textwrap.fill(data["summary"], WIDTH - 6), "    "))


async def _print_searches(pool: asyncpg.Pool, settings: Settings) -> None:
    from mlpipe.embedding.local import MODEL_NAME, LocalEmbedder

    embedder = LocalEmbedder(settings.embedding_model_dir)

    async def embed(texts: list[str]) -> list[Any]:
        return (await embedder(texts, MODEL_NAME)).vectors

    print("\n== similarity search (mlpipe.search, local all-MiniLM-L6-v2, pgvector HNSW)")
    for query in QUERIES:
        print(f"  {query!r}")
        for hit in await search(pool, query, embedder=embed, limit=3):
            print("    " + _hit_line(hit))
    await embedder.aclose()


def _hit_line(hit: Hit) -> str:
    when = (f" [{hit.start_s:.1f}-{hit.end_s:.1f}s]" if hit.start_s is not None
            and hit.end_s is not None else "")
    text = " ".join(hit.chunk_text.split())
    text = text if len(text) <= 60 else text[:59] + "…"
    return (f"{hit.similarity:.3f}  {hit.share_id}#{hit.chunk_index} "
            f"({hit.embedding_type}){when}  {text}")


async def _run_search_cli(demo: Demo) -> None:
    query = "sourdough starter"
    print(f"\n== mlpipe search {query!r} --limit 2 --backend local")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mlpipe.cli", "search", query, "--limit", "2", "--backend",
        "local", env=demo.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    async with asyncio.timeout(120):
        out, err = await proc.communicate()
    print(textwrap.indent(out.decode().rstrip(), "  "))
    if proc.returncode != 0:
        print(err.decode(), file=sys.stderr)
        raise SystemExit(f"mlpipe search exited {proc.returncode}")


# --- set-up and clean-up ----------------------------------------------------------------------


def _check_prerequisites() -> None:
    """Fail early with the step that fixes it (`make setup`, apt) instead of mid-run."""
    from mlpipe.embedding.local import model_files
    from mlpipe.errors import PermanentError

    settings = Settings()
    problems = []
    if shutil.which("espeak-ng") is None or shutil.which("ffmpeg") is None:
        problems.append("espeak-ng and ffmpeg are needed: apt-get install -y espeak-ng ffmpeg")
    if not settings.whisper_model_dir or not Path(settings.whisper_model_dir).is_dir():
        problems.append("MLPIPE_WHISPER_MODEL_DIR is not a model directory: run `make setup` "
                        "(the Makefile exports it)")
    try:
        model_files(settings.embedding_model_dir)
    except PermanentError as exc:
        problems.append(f"{exc} (run `make setup`; the Makefile exports it)")
    if problems:
        raise SystemExit("demo cannot run:\n  " + "\n  ".join(problems))


def _speak(dest: Path) -> Path:
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "140", "-w", str(dest), SPOKEN],
                   check=True, capture_output=True, timeout=60)
    return dest


async def _cleanup(settings: Settings) -> None:
    """Queues and exchanges of the demo's namespace, its schema (unless DEMO_KEEP=1), and its
    Redis keys."""
    topo = topology_from(settings)
    conn = await connect_any(settings.broker_url, name="mlpipe-demo-cleanup")
    async with conn:
        channel = await conn.channel()
        queues = [topo.queue_name(q) for q in topo.queues] + [
            topo.delay_queue_name(t) for t in topo.delay_tiers_ms] + [
            topo.dead_letter_queue, topo.workflow_queue]
        for name in queues:
            await channel.queue_delete(name)
        for exchange in (topo.tasks_exchange, topo.retry_exchange, topo.delay_exchange,
                         topo.dead_letter_exchange, topo.events_exchange):
            await channel.exchange_delete(exchange)
    if os.environ.get("DEMO_KEEP") == "1":
        print(f"kept schema {settings.database_schema} (DEMO_KEEP=1)")
    else:
        pg = await asyncpg.connect(settings.database_url)
        try:
            await pg.execute(f'DROP SCHEMA IF EXISTS "{settings.database_schema}" CASCADE')
        finally:
            await pg.close()
    await _drop_redis_keys(settings)
    print(f"cleaned up {settings.namespace}")


async def _drop_redis_keys(settings: Settings) -> None:
    import redis.asyncio as aioredis

    client = aioredis.from_url(settings.redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{settings.lock_prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

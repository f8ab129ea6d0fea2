"""The production log format: every line one JSON object, with the task's bound fields, in the
order written, whatever the values (in a fresh process: ``configure`` sets global state)."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys

_SCRIPT = r"""
import logging
import structlog
from mlpipe.logs import configure

configure(json=True, level="INFO")
log = structlog.get_logger("mlpipe.test")
structlog.contextvars.bind_contextvars(queue="ml.embed", share_id="s1", attempt=1,
                                       traceparent=None)

class Odd:
    def __repr__(self):
        return "<odd>"

class Custom:
    def __structlog__(self):
        return {"custom": True}

log.info("task.done", skipped=False)
logging.getLogger("aiormq.connection").warning("from %s", "stdlib")
log.debug("dropped below INFO")
log.info("odd.values", obj=Odd(), custom=Custom(), raw=b"\xff\xfe", lone="\ud800", n=(1, 2))
try:
    1 / 0
except ZeroDivisionError:
    log.exception("task.crashed")
structlog.contextvars.unbind_contextvars("share_id")
log.warning("after.unbind", queue="ml.other")
"""


def test_every_line_is_json_with_bound_fields_in_order() -> None:
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    lines = [json.loads(line) for line in out.stderr.decode().splitlines()]
    assert [e["event"] for e in lines] == ["task.done", "from stdlib", "odd.values",
                                           "task.crashed", "after.unbind"]
    done, stdlib, odd, crashed, after = lines
    assert done == {"event": "task.done", "skipped": False, "queue": "ml.embed",
                    "share_id": "s1", "attempt": 1, "traceparent": None, "level": "info",
                    "timestamp": done["timestamp"]}
    stamp = datetime.datetime.strptime(done["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ")
    age = datetime.datetime.now(datetime.UTC).replace(tzinfo=None) - stamp
    assert datetime.timedelta(0) <= age < datetime.timedelta(seconds=60)
    assert (stdlib["level"], stdlib["logger"], stdlib["share_id"]) == (
        "warning", "aiormq.connection", "s1")
    assert odd["obj"] == "<odd>"
    assert odd["custom"] == {"custom": True}
    assert odd["raw"] == repr(b"\xff\xfe")
    assert odd["lone"] == "\ud800"
    assert odd["n"] == [1, 2]
    assert crashed["level"] == "error"
    assert "ZeroDivisionError" in crashed["exception"]
    assert after["queue"] == "ml.other"
    assert "share_id" not in after


_IN_LOOP = r"""
import asyncio, logging, os, sys
import structlog
from mlpipe.logs import configure

configure(json=True, level="INFO")
log = structlog.get_logger("mlpipe.test")

async def main():
    log.info("first")
    logging.getLogger("aiormq.connection").warning("second")
    log.info("third")
    await asyncio.sleep(0)
    log.info("fourth")
    await asyncio.sleep(0)
    # before the interpreter's own flush at exit: the pass above has written it
    os.write(1, str(os.fstat(2).st_size).encode())
    os._exit(0)

asyncio.run(main())
"""


def test_lines_in_a_loop_keep_their_order_and_are_written_within_the_pass(tmp_path) -> None:
    err = tmp_path / "stderr"
    with err.open("wb") as sink:
        out = subprocess.run([sys.executable, "-c", _IN_LOOP], stdout=subprocess.PIPE,
                             stderr=sink, timeout=60)
    data = err.read_bytes()
    assert out.returncode == 0, data.decode(errors="replace")
    assert [json.loads(line)["event"] for line in data.decode().splitlines()] == [
        "first", "second", "third", "fourth"]
    assert int(out.stdout) == len(data)  # written before os._exit, which flushes nothing


class _Sink:
    def __init__(self) -> None:
        self.buffer = b""
        self.flushed: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.buffer += data
        return len(data)

    def flush(self) -> None:
        if self.buffer:
            self.flushed.append(self.buffer)
            self.buffer = b""


def test_one_flush_per_loop_pass_errors_and_loopless_lines_at_once() -> None:
    import asyncio

    from mlpipe.logs import LoopFlushedLogger

    sink = _Sink()
    logger = LoopFlushedLogger(sink)
    logger.info(b"no loop")
    assert sink.flushed == [b"no loop\n"]

    async def main() -> None:
        for i in range(3):
            logger.info(b"line %d" % i)
        assert sink.flushed == [b"no loop\n"]  # not yet: the pass is not over
        await asyncio.sleep(0)
        assert sink.flushed[1:] == [b"line 0\nline 1\nline 2\n"]
        logger.info(b"pending")
        logger.error(b"boom")  # an error takes what is pending with it, at once
        assert sink.flushed[2:] == [b"pending\nboom\n"]
        await asyncio.sleep(0)
        assert len(sink.flushed) == 3

    asyncio.run(main())

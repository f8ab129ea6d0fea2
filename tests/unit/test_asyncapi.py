"""``contracts/asyncapi.json``: valid AsyncAPI 3.0, in step with the code, and meaningful.

The AsyncAPI 3.0.0 JSON Schema comes from the npm package ``@asyncapi/specs`` (Apache-2.0), a
pinned devDependency of ``contracts/node`` that ``make setup`` installs with ``npm ci``; it is
read from ``node_modules``, never downloaded at test time. A missing copy fails (it is not
skipped), saying what to run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydantic import Field, create_model

from mlpipe.broker.topology import WORK_QUEUES
from mlpipe.contract import asyncapi
from mlpipe.contract.models import TASK_MODELS, EmbedTask, TaskType, build_task
from mlpipe.producer import topology_from
from mlpipe.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "contracts" / "asyncapi.json"
SPEC = ROOT / "contracts/node/node_modules/@asyncapi/specs/schemas/3.0.0.json"


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return json.loads(COMMITTED.read_text())


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    if not SPEC.is_file():
        pytest.fail(f"{SPEC} is missing: run `npm ci --prefix contracts/node` (make setup does)")
    spec = json.loads(SPEC.read_text())
    assert spec["properties"]["asyncapi"]["const"] == "3.0.0"
    return jsonschema.Draft7Validator(spec)


def test_committed_document_is_what_the_code_generates() -> None:
    assert COMMITTED.read_text() == asyncapi.render(asyncapi.document()), \
        "contracts/asyncapi.json is stale: run `mlpipe contract asyncapi`"
    assert asyncapi.write(COMMITTED, check=True) == 0


def test_cli_check(tmp_path: Path) -> None:
    """`mlpipe contract asyncapi [--check]`, as CI and developers run it."""
    mlpipe = Path(sys.executable).parent / "mlpipe"
    ok = subprocess.run([str(mlpipe), "contract", "asyncapi", "--check"], cwd=ROOT,
                        capture_output=True, text=True, timeout=60, check=False)
    assert ok.returncode == 0, ok.stderr
    target = tmp_path / "asyncapi.json"
    stale = subprocess.run([str(mlpipe), "contract", "asyncapi", str(target), "--check"],
                           capture_output=True, text=True, timeout=60, check=False)
    assert stale.returncode == 1
    assert "out of date" in stale.stderr
    written = subprocess.run([str(mlpipe), "contract", "asyncapi", str(target)],
                             capture_output=True, text=True, timeout=60, check=False)
    assert written.returncode == 0, written.stderr
    assert target.read_text() == COMMITTED.read_text()


def test_worker_headers_are_documented(doc: dict[str, Any]) -> None:
    """The headers a worker sets on retries and dead-letters, as mlpipe.worker.settle names
    them (the generator lists them without importing the worker)."""
    from mlpipe.worker.headers import MLPIPE_HEADERS

    documented = set(doc["components"]["schemas"]["TaskHeaders"]["properties"])
    assert set(MLPIPE_HEADERS) | {"traceparent"} == documented


def test_document_does_not_depend_on_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLPIPE_NAMESPACE", "staging")
    monkeypatch.setenv("MLPIPE_RETRY", '{"max_retries": 1}')
    assert asyncapi.render(asyncapi.document()) == COMMITTED.read_text()


def test_a_changed_model_is_drift(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The drift check must catch a contract change: a new required field on embed tasks."""
    changed = create_model("EmbedTask", __base__=EmbedTask,
                           priority=(int, Field(ge=0, alias="priority")))
    monkeypatch.setitem(TASK_MODELS, TaskType.EMBED_VECTORS, changed)
    regenerated = asyncapi.render(asyncapi.document())
    assert regenerated != COMMITTED.read_text()
    assert '"priority"' in regenerated
    stale = tmp_path / "asyncapi.json"
    stale.write_text(COMMITTED.read_text())
    assert asyncapi.write(stale, check=True) == 1


def test_valid_asyncapi_3(doc: dict[str, Any], validator: jsonschema.Draft7Validator) -> None:
    errors = [f"{list(e.absolute_path)}: {e.message[:200]}" for e in validator.iter_errors(doc)]
    assert errors == []
    assert doc["asyncapi"] == "3.0.0"


def test_the_schema_catches_a_broken_document(doc: dict[str, Any],
                                              validator: jsonschema.Draft7Validator) -> None:
    """The meta-schema really checks the AMQP bindings and the operation shape (so a passing
    validation above means something)."""
    broken = json.loads(json.dumps(doc))
    broken["channels"]["queueTranscribe"]["bindings"]["amqp"]["is"] = "exchange"
    broken["operations"]["consumeEmbed"]["action"] = "subscribe"  # AsyncAPI 2 wording
    paths = {tuple(e.absolute_path) for e in validator.iter_errors(broken)}
    assert paths == {("channels", "queueTranscribe"), ("operations", "consumeEmbed")}


def _pointer(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_every_reference_resolves(doc: dict[str, Any]) -> None:
    refs = _refs(doc)
    assert len(refs) > 100
    for ref in refs:
        _pointer(doc, ref)  # KeyError names the dangling reference


def test_operations_send_their_channels_messages(doc: dict[str, Any]) -> None:
    """AsyncAPI 3: an operation's messages must be a subset of its channel's."""
    for name, op in doc["operations"].items():
        channel_ref = op["channel"]["$ref"]
        for message in op["messages"]:
            assert message["$ref"].startswith(channel_ref + "/messages/"), name
            _pointer(doc, message["$ref"])


def test_topology_names(doc: dict[str, Any]) -> None:
    topo = topology_from(Settings.model_construct())
    addresses = {c["address"] for c in doc["channels"].values()}
    for queue in WORK_QUEUES:
        assert topo.queue_name(queue) in addresses
        for key in queue.routing_keys:
            assert key in addresses
    for tier in topo.delay_tiers_ms:
        assert topo.delay_queue_name(tier) in addresses
    assert {"ml.transcribe_local", "summarize_llm.local", "mlpipe.dead", "mlpipe.workflow",
            "ml.result.{taskType}"} <= addresses
    exchanges = {c["bindings"]["amqp"]["exchange"]["name"]: c["bindings"]["amqp"]["exchange"]
                 ["type"] for c in doc["channels"].values()
                 if c["bindings"]["amqp"]["is"] == "routingKey"}
    assert exchanges == {"mlpipe.tasks": "direct", "mlpipe.delay": "headers",
                         "mlpipe.retry": "direct", "mlpipe.dlx": "fanout",
                         "mlpipe.events": "topic"}
    queue = doc["channels"]["queueSummarize"]
    assert queue["x-mlpipe-queue-arguments"] == topo.work_queue_arguments()
    assert set(queue["messages"]) == {"summarizeLlmTask", "summarizeVideoCombinedTask"}
    publish = doc["operations"]["publishEmbedVectorsLocal"]
    assert publish["bindings"]["amqp"]["mandatory"] is True
    assert doc["channels"]["taskEmbedVectorsLocal"]["address"] == "embed_vectors.local"


def _payload_validator(doc: dict[str, Any], message_id: str) -> jsonschema.Validator:
    payload_ref = doc["components"]["messages"][message_id]["payload"]["$ref"]
    schema = {"$ref": payload_ref, "components": doc["components"]}
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("task_type", list(TaskType))
def test_message_schemas_accept_real_tasks_and_refuse_broken_ones(
        doc: dict[str, Any], task_type: TaskType) -> None:
    payloads: dict[TaskType, dict[str, Any]] = {
        TaskType.TRANSCRIBE_WHISPER: {"mediaUrl": "s3://bucket/a.wav", "language": "en"},
        TaskType.SUMMARIZE_LLM: {"content": {"text": "Some text.", "type": "article"},
                                 "options": {"maxLength": 100}},
        TaskType.SUMMARIZE_VIDEO_COMBINED: {"transcript": {"text": "hi"}, "hashtags": ["a"]},
        TaskType.EMBED_VECTORS: {"content": {"text": "x", "segments": [
            {"start": 0, "end": 1.5, "text": "x"}]}, "options": {"embeddingType": "summary"}},
    }
    task = build_task(task_type, "share-1", payloads[task_type])
    wire = json.loads(task.model_dump_json(by_alias=True, exclude_none=True))
    message_id = next(m for m, v in doc["components"]["messages"].items()
                      if v["name"] == task_type.value)
    validator = _payload_validator(doc, message_id)
    validator.validate(wire)
    broken = {**wire, "shareId": "has spaces/slash"}
    assert not validator.is_valid(broken)
    other = next(t for t in TaskType if t is not task_type)
    assert not validator.is_valid({**wire, "taskType": other.value})


def test_result_event_schema(doc: dict[str, Any]) -> None:
    validator = _payload_validator(doc, "resultEvent")
    event = {"version": "1.0", "shareId": "s", "taskType": "embed_vectors",
             "status": "completed", "occurredAt": 1.0, "costUsd": 0.0,
             "resultRef": {"table": "ml_results", "shareId": "s", "taskType": "embed_vectors"}}
    validator.validate(event)
    assert not validator.is_valid({**event, "status": "maybe"})

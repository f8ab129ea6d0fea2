"""Contract v1: schemas in contracts/ match the models, examples validate, bad input is
refused with a precise reason."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlpipe.contract.codec import decode, encode
from mlpipe.contract.models import TASK_MODELS, TaskType, build_task
from mlpipe.contract.schema import render, schemas
from mlpipe.errors import ContractError, UnknownTaskType, UnsupportedVersion

CONTRACTS = Path(__file__).resolve().parents[2] / "contracts"
EXAMPLES = sorted((CONTRACTS / "examples").glob("*.json"))


def test_committed_schemas_match_models() -> None:
    for name, doc in schemas().items():
        path = CONTRACTS / name
        assert path.exists(), f"{path} missing: run `mlpipe contract export`"
        assert path.read_text() == render(doc), (
            f"{name} drifted from the models: run `mlpipe contract export`")


def test_one_example_per_task_type() -> None:
    assert {p.stem for p in EXAMPLES} == {t.value for t in TaskType}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_examples_validate(path: Path) -> None:
    task = decode(path.read_bytes())
    assert task.task_type.value == path.stem
    assert decode(encode(task)) == task


def _valid() -> dict:
    return json.loads((CONTRACTS / "examples" / "summarize_llm.json").read_text())


def test_unknown_fields_are_ignored_within_major() -> None:
    doc = _valid()
    doc["version"] = "1.7"
    doc["newTopLevel"] = {"x": 1}
    doc["payload"]["content"]["sentiment"] = "calm"
    doc["metadata"]["tenant"] = "acme"
    assert decode(json.dumps(doc).encode()).share_id == doc["shareId"]


@pytest.mark.parametrize(
    ("mutate", "error", "reason"),
    [
        (lambda d: d.update(version="2.0"), UnsupportedVersion, "unsupported_version"),
        (lambda d: d.pop("version"), UnsupportedVersion, "unsupported_version"),
        (lambda d: d.update(taskType="translate"), UnknownTaskType, "unknown_task_type"),
        (lambda d: d["metadata"].update(retryCount="1"), ContractError, "schema_violation"),
        (lambda d: d.pop("shareId"), ContractError, "schema_violation"),
        (lambda d: d["payload"]["content"].update(text=""), ContractError, "schema_violation"),
        (lambda d: d["payload"]["content"].update(type="podcast"), ContractError,
         "schema_violation"),
        (lambda d: d.update(shareId="../../etc/passwd"), ContractError, "schema_violation"),
    ],
)
def test_bad_messages_are_refused_with_reason(mutate, error, reason) -> None:  # type: ignore[no-untyped-def]
    doc = _valid()
    mutate(doc)
    with pytest.raises(error) as info:
        decode(json.dumps(doc).encode())
    assert info.value.reason == reason


@pytest.mark.parametrize("body", [b"", b"not json", b"\xff\xfe\x00", b"[1,2]", b"null"])
def test_non_objects_are_contract_errors(body: bytes) -> None:
    with pytest.raises(ContractError):
        decode(body)


def test_marker_inside_text_does_not_confuse_the_fast_path() -> None:
    task = build_task(TaskType.SUMMARIZE_LLM, "s-1",
                      {"content": {"text": 'quoted "taskType":"embed_vectors" inside text'}})
    assert decode(encode(task)).task_type is TaskType.SUMMARIZE_LLM


def test_oversized_body_is_refused_before_parsing() -> None:
    with pytest.raises(ContractError) as info:
        decode(b"{" + b" " * (5 * 1024 * 1024) + b"}")
    assert info.value.reason == "too_large"


def test_deeply_nested_json_is_a_contract_error() -> None:
    with pytest.raises(ContractError) as info:
        decode(b'{"a":' * 100_000 + b"1" + b"}" * 100_000)
    assert info.value.reason == "not_json"


@settings(max_examples=200, deadline=None)
@given(task_type=st.sampled_from(list(TaskType)), decoy=st.sampled_from(list(TaskType)),
       text=st.text(min_size=1, max_size=60), spaced=st.booleans(),
       order=st.randoms(use_true_random=False))
def test_fast_path_agrees_with_a_full_parse(task_type: TaskType, decoy: TaskType, text: str,
                                            spaced: bool, order: random.Random) -> None:
    """However the JSON is laid out (key order, spacing, a task-type marker in a text field
    or in an unknown object that may come first), the fast path's guess never changes the
    result."""
    doc = json.loads((CONTRACTS / "examples" / f"{task_type.value}.json").read_text())
    doc["unknownExtra"] = {"taskType": decoy.value}
    payload = doc["payload"]
    for key in ("content", "transcript"):
        if key in payload:
            payload[key]["text"] = text + ' "taskType":"embed_vectors" ' + text
    items = list(doc.items())
    order.shuffle(items)
    body = json.dumps(dict(items), separators=(", ", ": ") if spaced else (",", ":")).encode()
    placed = any(key in payload for key in ("content", "transcript"))
    if placed and "\x00" in text:  # refused before either path (Postgres cannot store it)
        with pytest.raises(ContractError) as info:
            decode(body)
        assert info.value.reason == "binary_content"
        return
    assert decode(body) == TASK_MODELS[task_type].model_validate_json(body)


def test_a_nul_character_in_any_string_is_refused_up_front() -> None:
    """Postgres text and jsonb cannot hold U+0000: refused at decode, not retried at persist."""
    doc = json.loads((Path(__file__).parents[2] / "contracts/examples/summarize_llm.json")
                      .read_text())
    for where in ("text", "key"):
        bad = json.loads(json.dumps(doc))
        if where == "text":
            bad["payload"]["content"]["text"] = "before\x00after"
        else:
            bad["payload"]["content"]["x\x00y"] = "unknown field"
        with pytest.raises(ContractError) as err:
            decode(json.dumps(bad).encode())
        assert err.value.reason == "binary_content"
    # the six characters backslash-u-0-0-0-0 as text are not a NUL
    fine = json.loads(json.dumps(doc))
    fine["payload"]["content"]["text"] = "a literal \\u0000 in a text"
    assert decode(json.dumps(fine).encode()).payload.content.text.endswith("\\u0000 in a text")

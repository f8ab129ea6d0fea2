"""Bytes on the wire to validated tasks and back.

Decoding is on every delivery's hot path, so the happy path is a single
``model_validate_json`` call; only a message that fails is parsed again to say precisely why
(not JSON, unknown version, unknown task type, or which field is wrong).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from mlpipe.contract.models import MAJOR_VERSION, TASK_MODELS, Task, TaskType
from mlpipe.errors import ContractError, UnknownTaskType, UnsupportedVersion

#: Bodies above this size are refused before parsing (a contract message is a few KiB; a
#: transcript-sized ``content.text`` stays far below it).
MAX_BODY_BYTES = 4 * 1024 * 1024

_TASK_TYPES = {t.value: t for t in TaskType}


def decode(body: bytes) -> Task:
    """Validate one message body; raise a ``ContractError`` subclass saying why it is refused."""
    if len(body) > MAX_BODY_BYTES:
        raise ContractError(
            f"body is {len(body)} bytes, above the {MAX_BODY_BYTES}-byte limit", reason="too_large"
        )
    if b"\\u0000" in body and _has_nul(body):
        # valid JSON, but Postgres text and jsonb cannot hold it: refused here rather than
        # failing (and being retried) at persist time
        raise ContractError("a string holds a NUL character (\\u0000): binary content, not text",
                            reason="binary_content")
    task_type = _sniff_task_type(body)
    if task_type is not None:
        try:
            return _VALIDATE_JSON[task_type](body)  # type: ignore[no-any-return]
        except ValidationError:
            pass  # maybe the marker sat inside a text field: the slow path decides
    return _slow_decode(body)


def _has_nul(body: bytes) -> bool:
    """Whether a decoded string (key or value) holds U+0000; a body that is no JSON at all is
    left to the parse that explains why."""
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    stack: list[Any] = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def task_type_of(doc: dict[str, Any]) -> TaskType:
    raw = doc.get("taskType")
    if not isinstance(raw, str) or raw not in _TASK_TYPES:
        raise UnknownTaskType(f"unknown taskType {raw!r}; known: {sorted(_TASK_TYPES)}")
    return _TASK_TYPES[raw]


def encode(task: Task) -> bytes:
    return task.model_dump_json(by_alias=True, exclude_none=True).encode()


def _sniff_task_type(body: bytes) -> TaskType | None:
    """The string after the first ``"taskType":``, if it names a task type, without a full
    parse. A guess: validation then checks it, and a wrong or missing guess sends us to the
    slow path."""
    at = body.find(_KEY)
    if at < 0:
        return None
    start = body.find(b'"', at + len(_KEY))
    end = body.find(b'"', start + 1) if start >= 0 else -1
    return _BY_VALUE.get(body[start + 1:end]) if end >= 0 else None


_KEY = b'"taskType":'
_BY_VALUE = {t.value.encode(): t for t in TaskType}
#: Each task type's validator, called directly: ``model_validate_json`` adds a call and
#: argument checks to every delivery.
_VALIDATE_JSON = {tt: model.__pydantic_validator__.validate_json
                  for tt, model in TASK_MODELS.items()}


def _slow_decode(body: bytes) -> Task:
    """Parse fully and raise the most specific contract error, or return the task when the
    fast path merely failed to recognise an unusually formatted but valid message."""
    try:
        doc = json.loads(body)
    # ValueError covers JSONDecodeError and UnicodeDecodeError, and also what json.loads
    # raises for an integer of more than 4300 digits (found by tests/unit/test_contract_fuzz)
    except (ValueError, RecursionError) as err:
        raise ContractError(f"body is not JSON: {type(err).__name__}: {err}"[:300],
                            reason="not_json") from None
    if not isinstance(doc, dict):
        raise ContractError(f"body is JSON {type(doc).__name__}, not an object",
                            reason="not_object")
    version = doc.get("version")
    if not isinstance(version, str) or version.split(".")[0] != str(MAJOR_VERSION):
        raise UnsupportedVersion(
            f"unsupported contract version {version!r}; this consumer speaks {MAJOR_VERSION}.x"
        )
    task_type = task_type_of(doc)
    try:
        return TASK_MODELS[task_type].model_validate_json(body)
    except ValidationError as err:
        raise ContractError(
            f"schema violation: {_summarise(err)}", reason="schema_violation"
        ) from None


def _summarise(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False)[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{loc}: {err['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")

"""Reading the original system's Celery messages, so its producers need not change on day one.

Celery protocol 2 puts the task's name, id and retry count in the AMQP headers (``task``,
``id``, ``retries``) and a JSON body ``[args, kwargs, embed]``. The original Node producer
sent ``(share_id, content | media_url, options)``; a configurable table maps each task name to
a contract-v1 task type, and the arguments become that type's payload. The result is an
ordinary validated v1 task, so everything after decoding (lock, stored result, budget,
persistence) treats both the same. Anything that does not map is a ``ContractError``:
dead-lettered with the reason, never guessed at.
"""

from __future__ import annotations

import json
import time
from typing import Any

from mlpipe.contract.codec import decode
from mlpipe.contract.models import CONTRACT_VERSION, Task, TaskType
from mlpipe.errors import ContractError

#: The original system's task names.
DEFAULT_TASK_MAP: dict[str, str] = {
    "llm_service.tasks.summarize_content": TaskType.SUMMARIZE_LLM.value,
    "llm_service.tasks.summarize_video_combined": TaskType.SUMMARIZE_VIDEO_COMBINED.value,
    "whisper.tasks.transcribe_api": TaskType.TRANSCRIBE_WHISPER.value,
    "whisper.tasks.transcribe_local": TaskType.TRANSCRIBE_WHISPER.value,
    "vector_service.tasks.generate_embeddings": TaskType.EMBED_VECTORS.value,
}

#: Positional argument names of each task type, as the original producer called them.
_ARG_NAMES: dict[TaskType, tuple[str, ...]] = {
    TaskType.TRANSCRIBE_WHISPER: ("share_id", "media_url", "options"),
    TaskType.SUMMARIZE_LLM: ("share_id", "content", "options"),
    TaskType.SUMMARIZE_VIDEO_COMBINED: ("share_id", "transcript", "options"),
    TaskType.EMBED_VECTORS: ("share_id", "content", "options"),
}


def is_celery(headers: dict[str, Any] | None) -> bool:
    return bool(headers) and "task" in headers and "id" in headers  # type: ignore[operator]


def from_celery(headers: dict[str, Any], body: bytes, task_map: dict[str, str],
                *, local: bool = False) -> Task:
    """A Celery protocol-2 message as a validated contract-v1 task."""
    name = _text(headers.get("task"))
    if name not in task_map:
        raise ContractError(f"Celery task {name!r} has no mapping; known: {sorted(task_map)}",
                            reason="unknown_celery_task")
    task_type = TaskType(task_map[name])
    try:
        decoded = json.loads(body)
        args, kwargs = decoded[0], decoded[1]
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise TypeError("expected [args, kwargs, embed]")
    except (ValueError, TypeError, IndexError, KeyError, RecursionError) as exc:
        raise ContractError(f"not a Celery protocol-2 JSON body: {exc}"[:300],
                            reason="celery_malformed") from None
    call = _bind(task_type, args, kwargs)
    options = call.get("options") or {}
    if not isinstance(options, dict):
        raise ContractError("Celery task options must be an object", reason="celery_malformed")
    if local or name.endswith("_local"):
        options = {**options, "backend": "local"}
    doc = {
        "version": CONTRACT_VERSION,
        "taskType": task_type.value,
        "shareId": str(call.get("share_id", "")),
        "payload": _payload(task_type, call, options),
        "metadata": {
            "correlationId": _text(headers.get("root_id")) or _text(headers["id"]),
            "timestamp": time.time(),  # protocol 2 carries no creation time
            "retryCount": _retries(headers.get("retries")),
            **({"traceparent": tp} if (tp := _text(headers.get("traceparent"))) else {}),
        },
    }
    return decode(json.dumps(doc).encode())


def _bind(task_type: TaskType, args: list[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    names = _ARG_NAMES[task_type]
    if len(args) > len(names):
        raise ContractError(f"{len(args)} positional arguments; {task_type.value} takes "
                            f"{', '.join(names)}", reason="celery_malformed")
    call = dict(zip(names, args, strict=False))
    for key, value in kwargs.items():
        call[_snake(key)] = value
    if not call.get("share_id"):
        raise ContractError("Celery task without a share_id", reason="celery_malformed")
    return call


def _payload(task_type: TaskType, call: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    if task_type is TaskType.TRANSCRIBE_WHISPER:
        return {"mediaUrl": call.get("media_url"), "language": options.get("language"),
                "options": options}
    if task_type is TaskType.SUMMARIZE_VIDEO_COMBINED:
        return {"transcript": _content(call.get("transcript")), "caption": call.get("caption"),
                "hashtags": call.get("hashtags") or [], "options": options}
    return {"content": _content(call.get("content")), "options": options}


def _content(value: Any) -> Any:
    """The original producer sent either plain text or a ``{text, title, ...}`` object."""
    return {"text": value} if isinstance(value, str) else value


def _snake(key: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in key)


def _text(value: Any) -> str | None:
    """A header value as text. AMQP hands over a string header that is not UTF-8 as bytes;
    such a header is malformed, not a reason to retry (found by
    tests/unit/test_contract_fuzz)."""
    if value is None:
        return None
    if not isinstance(value, bytes):
        return str(value)
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise ContractError(f"Celery header value {value[:40]!r} is not UTF-8",
                            reason="celery_malformed") from None


def _retries(value: Any) -> int:
    return value if isinstance(value, int) and value >= 0 else 0

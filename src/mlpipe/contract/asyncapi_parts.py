"""The pieces ``asyncapi.document`` assembles: message schemas from the contract models,
message entries, AMQP bindings and the names and references that tie them together."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from mlpipe.broker.topology import DELAY_TIER_HEADER, WORK_QUEUES, WorkQueue
from mlpipe.contract.events import ResultEvent
from mlpipe.contract.models import TASK_MODELS, TaskType

AMQP_BINDING_VERSION = "0.3.0"
_SCHEMA_REF = "#/components/schemas/{model}"
_VALIDATION: JsonSchemaMode = "validation"
#: Headers the worker adds when it retries or dead-letters a task (``mlpipe.worker.headers``);
#: listed here, not imported, so the contract module does not pull in the worker.
_RETRY_HEADERS = {
    "x-mlpipe-retry-count": ("integer", "how often the task was retried so far"),
    "x-mlpipe-origin-queue": ("string", "the work queue the task came from"),
    "x-mlpipe-routing-key": ("string", "the task's original routing key"),
    "x-mlpipe-reason": ("string", "why it was retried or dead-lettered (e.g. rate_limited)"),
    "x-mlpipe-error-class": ("string", "the exception class of the last failure"),
    "x-mlpipe-error": ("string", "the error text of the last failure"),
    "x-mlpipe-attempts": ("integer", "deliveries of this task so far"),
    "x-mlpipe-dead-lettered-at": ("number", "Unix seconds when it was dead-lettered"),
    "x-mlpipe-deferrals": ("integer", "times it waited for another worker's lock"),
}


def _schemas() -> dict[str, Any]:
    """Every contract model's JSON Schema under ``components/schemas``, references rewritten
    to point there (the contract's ``*.schema.json`` files keep theirs in ``$defs``)."""
    models: list[type[BaseModel]] = [*TASK_MODELS.values(), ResultEvent]
    inputs = [(m, _VALIDATION) for m in models]
    _, top = models_json_schema(inputs, by_alias=True,
                                ref_template=_SCHEMA_REF)
    defs: dict[str, Any] = top["$defs"]
    defs["TaskHeaders"] = {
        "type": "object",
        "description": "AMQP headers of a task message. mlpipe's own `x-mlpipe-*` headers are "
                       "set by workers on retries and dead-letters, never by producers.",
        "properties": {
            "traceparent": {"type": "string", "description": "W3C trace context, as in "
                            "`metadata.traceparent` (the header wins for tracing)"},
            DELAY_TIER_HEADER: {"type": "string", "description": "delay tier in ms (retries)"},
            **{name: {"type": kind, "description": text}
               for name, (kind, text) in _RETRY_HEADERS.items()},
        },
    }
    defs["WorkflowDeadline"] = {
        "type": "object",
        "required": ["kind", "shareId"],
        "properties": {"kind": {"const": "video_deadline"}, "shareId": {"type": "string"},
                       "correlationId": {"type": "string"}},
    }
    return dict(sorted(defs.items()))


def _messages() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for task_type, model in TASK_MODELS.items():
        out[_message_id(task_type)] = {
            "name": task_type.value,
            "title": f"{task_type.value} task",
            "summary": f"A contract-v1 {task_type.value} task, validated by the "
                       f"{model.__name__} model.",
            "contentType": "application/json",
            "payload": _ref("components/schemas", model.__name__),
            "headers": _ref("components/schemas", "TaskHeaders"),
            "correlationId": {"description": "the task's correlation id (also the AMQP "
                                             "correlation_id property)",
                              "location": "$message.payload#/metadata/correlationId"},
            "bindings": {"amqp": {"messageType": task_type.value,
                                  "bindingVersion": AMQP_BINDING_VERSION}},
        }
    out["resultEvent"] = {
        "name": "result_event",
        "title": "result event",
        "summary": "A task completed (its result is committed) or failed (dead-lettered).",
        "contentType": "application/json",
        "payload": _ref("components/schemas", "ResultEvent"),
        "correlationId": {"location": "$message.payload#/correlationId"},
        "bindings": {"amqp": {"messageType": "result_event",
                              "bindingVersion": AMQP_BINDING_VERSION}},
    }
    out["workflowDeadline"] = {
        "name": "video_deadline",
        "title": "video workflow deadline",
        "contentType": "application/json",
        "payload": _ref("components/schemas", "WorkflowDeadline"),
    }
    return out


def _queue_of(task_type: TaskType, local: bool) -> WorkQueue:
    return next(q for q in WORK_QUEUES if task_type in q.task_types and q.local == local)


def _exchange_binding(name: str, kind: str) -> dict[str, Any]:
    return {"is": "routingKey", "bindingVersion": AMQP_BINDING_VERSION,
            "exchange": {"name": name, "type": kind, "durable": True, "autoDelete": False,
                         "vhost": "/"}}


def _queue_binding(name: str) -> dict[str, Any]:
    return {"is": "queue", "bindingVersion": AMQP_BINDING_VERSION,
            "queue": {"name": name, "durable": True, "exclusive": False, "autoDelete": False,
                      "vhost": "/"}}


def _message_ref(message_id: str) -> dict[str, str]:
    return _ref("components/messages", message_id)


def _ref(where: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/{where}/{name}"}


def _channel_id(kind: str, name: str) -> str:
    return kind + _camel(name.replace(".", "_"))


def _message_id(task_type: TaskType) -> str:
    return task_type.value[0] + _camel(task_type.value)[1:] + "Task"


def _camel(snake: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in snake.split("_"))

"""The AsyncAPI 3.0 document of mlpipe's whole RabbitMQ topology, generated from the code.

Schema registries and AsyncAPI tooling (code generators, documentation, contract tests) read
``contracts/asyncapi.json``; nothing in it is written by hand. Names come from
``mlpipe.broker.topology`` (the same ``Topology`` the daemon declares, for the default
settings: no namespace, the default retry policy's delay tiers), message schemas from the
contract's pydantic models. ``mlpipe contract asyncapi --check`` and
``tests/unit/test_asyncapi.py`` fail when the committed file and the code disagree.

Channels come in two kinds, as in the AMQP binding: a *routing key* on an exchange (what a
producer publishes to) and a *queue* (what a worker consumes from). Both are described so a
producer in another language learns the routing keys and a consumer the queue names and their
arguments (quorum queues, delivery limit, dead-lettering).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlpipe.broker.topology import (
    DELAY_TIER_HEADER,
    LOCAL_SUFFIX,
    Topology,
    routing_key,
)
from mlpipe.contract import events
from mlpipe.contract.files import write_or_check
from mlpipe.contract.models import CONTRACT_VERSION, TaskType

from .asyncapi_parts import (
    AMQP_BINDING_VERSION,
    _camel,
    _channel_id,
    _exchange_binding,
    _message_id,
    _message_ref,
    _messages,
    _queue_binding,
    _queue_of,
    _ref,
    _schemas,
)

ASYNCAPI_VERSION = "3.0.0"
DEFAULT_PATH = Path("contracts/asyncapi.json")


def _topology() -> Topology:
    """The topology of the default settings, as the daemon and ``mlpipe topology`` derive it
    (imported late: ``mlpipe.producer`` imports the settings and the broker client)."""
    from mlpipe.producer import topology_from
    from mlpipe.settings import Settings

    return topology_from(Settings.model_construct())


def document(topo: Topology | None = None) -> dict[str, Any]:
    """The AsyncAPI 3.0 document as a dict (deterministic: same code, same document)."""
    topo = topo if topo is not None else _topology()
    schemas = _schemas()
    messages = _messages()
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}

    for task_type in TaskType:
        for local in (False, True):
            key = routing_key(task_type, local)
            cid = _channel_id("task", key)
            channels[cid] = {
                "address": key,
                "title": f"{task_type.value} tasks{' (self-hosted backend)' if local else ''}",
                "description": (
                    f"Publish a `{task_type.value}` task to the `{topo.tasks_exchange}` direct "
                    f"exchange with routing key `{key}`; it lands on "
                    f"`{topo.queue_name(_queue_of(task_type, local))}`. "
                    + ("The routing key with `.local` is what `options.backend: \"local\"` "
                       "asks for." if local else "")).strip(),
                "messages": {_message_id(task_type): _message_ref(_message_id(task_type))},
                "bindings": {"amqp": _exchange_binding(topo.tasks_exchange, "direct")},
            }
            op = f"publish{_camel(task_type.value)}{'Local' if local else ''}"
            operations[op] = {
                "action": "send",
                "channel": _ref("channels", cid),
                "title": f"Publish a {task_type.value} task",
                "summary": "What a producer does: persistent, mandatory (an unroutable task "
                           "comes back instead of vanishing), with publisher confirms.",
                "messages": [_ref(f"channels/{cid}/messages", _message_id(task_type))],
                "bindings": {"amqp": {"deliveryMode": 2, "mandatory": True,
                                      "bindingVersion": AMQP_BINDING_VERSION}},
            }

    for queue in topo.queues:
        name = topo.queue_name(queue)
        cid = _channel_id("queue", queue.short_name)
        channels[cid] = {
            "address": name,
            "title": f"work queue {name}",
            "description": (
                f"Quorum queue bound to `{topo.tasks_exchange}` with "
                + ", ".join(f"`{k}`" for k in queue.routing_keys)
                + f" and to `{topo.retry_exchange}` with `{name}` (retries come back here). "
                "A message redelivered more than the delivery limit is dead-lettered."),
            "messages": {_message_id(t): _message_ref(_message_id(t))
                         for t in queue.task_types},
            "bindings": {"amqp": _queue_binding(name)},
            "x-mlpipe-queue-arguments": topo.work_queue_arguments(),
            "x-mlpipe-routing-keys": list(queue.routing_keys),
        }
        operations[f"consume{_camel(queue.short_name)}"] = {
            "action": "receive",
            "channel": _ref("channels", cid),
            "title": f"Workers consume {name}",
            "summary": "`mlpipe consume --queues " + queue.short_name + "`: acknowledged "
                       "after the result is committed (at-least-once, effects exactly once).",
            "messages": [_ref(f"channels/{cid}/messages", _message_id(t))
                         for t in queue.task_types],
            "bindings": {"amqp": {"ack": True, "bindingVersion": AMQP_BINDING_VERSION}},
        }

    task_msgs = {_message_id(t): _message_ref(_message_id(t)) for t in TaskType}
    channels["delayExchange"] = {
        "address": None,
        "title": f"delay exchange {topo.delay_exchange}",
        "description": (
            f"Headers exchange: a retried task is republished here with header "
            f"`{DELAY_TIER_HEADER}` naming the delay tier (milliseconds) that holds it."),
        "messages": dict(task_msgs),
        "bindings": {"amqp": _exchange_binding(topo.delay_exchange, "headers")},
    }
    operations["retryLater"] = {
        "action": "send",
        "channel": _ref("channels", "delayExchange"),
        "title": "A worker retries a task after a transient error",
        "summary": "Republished with backoff; not counted against the delivery limit.",
        "messages": [_ref("channels/delayExchange/messages", m) for m in task_msgs],
        "bindings": {"amqp": {"deliveryMode": 2, "mandatory": True,
                              "bindingVersion": AMQP_BINDING_VERSION}},
    }
    for tier in topo.delay_tiers_ms:
        name = topo.delay_queue_name(tier)
        channels[_channel_id("delay", str(tier))] = {
            "address": name,
            "title": f"delay tier {tier} ms",
            "description": (
                f"Holds retried tasks whose delay fits in {tier} ms (header "
                f"`{DELAY_TIER_HEADER}: \"{tier}\"`); nobody consumes it. When a message's "
                f"TTL expires it is dead-lettered to `{topo.retry_exchange}` and routed back "
                "to its work queue."),
            "messages": dict(task_msgs),
            "bindings": {"amqp": _queue_binding(name)},
            "x-mlpipe-queue-arguments": topo.delay_queue_arguments(),
        }
    channels["retryExchange"] = {
        "address": "{queue}",
        "title": f"retry exchange {topo.retry_exchange}",
        "description": ("Direct exchange the delay queues dead-letter into; the routing key is "
                        "the name of the work queue the task goes back to."),
        "parameters": {"queue": {
            "description": "name of a work queue (or of the workflow control queue)",
            "enum": [topo.queue_name(q) for q in topo.queues] + [topo.workflow_queue]}},
        "messages": dict(task_msgs),
        "bindings": {"amqp": _exchange_binding(topo.retry_exchange, "direct")},
    }
    channels["deadLetterExchange"] = {
        "address": None,
        "title": f"dead-letter exchange {topo.dead_letter_exchange}",
        "description": ("Fanout exchange: tasks that failed permanently, ran out of retries or "
                        "hit the delivery limit. Headers `x-mlpipe-reason` and `x-mlpipe-error` "
                        "say why."),
        "messages": dict(task_msgs),
        "bindings": {"amqp": _exchange_binding(topo.dead_letter_exchange, "fanout")},
    }
    operations["deadLetter"] = {
        "action": "send",
        "channel": _ref("channels", "deadLetterExchange"),
        "title": "A worker dead-letters a task",
        "messages": [_ref("channels/deadLetterExchange/messages", m) for m in task_msgs],
    }
    channels["deadLetterQueue"] = {
        "address": topo.dead_letter_queue,
        "title": f"dead-letter queue {topo.dead_letter_queue}",
        "description": "Inspected and replayed with `mlpipe dlq list|replay`.",
        "messages": dict(task_msgs),
        "bindings": {"amqp": _queue_binding(topo.dead_letter_queue)},
        "x-mlpipe-queue-arguments": {"x-queue-type": "quorum"},
    }
    operations["inspectDeadLetters"] = {
        "action": "receive",
        "channel": _ref("channels", "deadLetterQueue"),
        "title": "An operator inspects or replays dead letters",
        "messages": [_ref("channels/deadLetterQueue/messages", m) for m in task_msgs],
    }
    channels["workflowControl"] = {
        "address": topo.workflow_queue,
        "title": f"workflow control queue {topo.workflow_queue}",
        "description": ("Internal: a video workflow's deadline, published through a delay tier "
                        "and consumed by the daemon, which falls back to a caption-only "
                        "summary when no transcript arrived in time."),
        "messages": {"workflowDeadline": _message_ref("workflowDeadline")},
        "bindings": {"amqp": _queue_binding(topo.workflow_queue)},
        "x-mlpipe-queue-arguments": topo.work_queue_arguments(),
    }
    operations["consumeWorkflowControl"] = {
        "action": "receive",
        "channel": _ref("channels", "workflowControl"),
        "title": "The daemon handles workflow deadlines",
        "messages": [_ref("channels/workflowControl/messages", "workflowDeadline")],
    }
    channels["resultEvents"] = {
        "address": events.routing_key(TaskType.TRANSCRIBE_WHISPER).replace(
            TaskType.TRANSCRIBE_WHISPER.value, "{taskType}"),
        "title": f"result events on {topo.events_exchange}",
        "description": (
            f"Topic exchange `{topo.events_exchange}`: a `completed` event after a result is "
            "committed, a `failed` one after a dead-letter. Bind `ml.result.#` for all of "
            "them or `ml.result.<taskType>` for one kind."),
        "parameters": {"taskType": {"description": "the task type the event is about",
                                    "enum": [t.value for t in TaskType]}},
        "messages": {"resultEvent": _message_ref("resultEvent")},
        "bindings": {"amqp": _exchange_binding(topo.events_exchange, "topic")},
    }
    operations["publishResultEvent"] = {
        "action": "send",
        "channel": _ref("channels", "resultEvents"),
        "title": "The daemon announces a finished or failed task",
        "messages": [_ref("channels/resultEvents/messages", "resultEvent")],
        "bindings": {"amqp": {"deliveryMode": 2, "bindingVersion": AMQP_BINDING_VERSION}},
    }
    operations["receiveResultEvents"] = {
        "action": "receive",
        "channel": _ref("channels", "resultEvents"),
        "title": "Any service listens for results",
        "messages": [_ref("channels/resultEvents/messages", "resultEvent")],
    }

    return {
        "asyncapi": ASYNCAPI_VERSION,
        "id": "urn:mlpipe:contract:v1",
        "info": {
            "title": "mlpipe",
            "version": CONTRACT_VERSION,
            "description": (
                "ML task pipeline on RabbitMQ: producers publish contract-v1 tasks, mlpipe "
                "workers transcribe, summarise and embed, and announce results. Generated by "
                "`mlpipe contract asyncapi` from the code; names are those of the default "
                f"settings (with `MLPIPE_NAMESPACE=ns` every exchange and queue is prefixed "
                f"`ns.`; the delay tiers follow `MLPIPE_RETRY`). Routing key `<taskType>"
                f"{LOCAL_SUFFIX}` selects the self-hosted backends."),
            "license": {"name": "Apache-2.0",
                        "url": "https://www.apache.org/licenses/LICENSE-2.0"},
        },
        "servers": {
            "rabbitmq": {
                "host": "{host}",
                "protocol": "amqp",
                "protocolVersion": "0-9-1",
                "description": "Any RabbitMQ >= 3.13 (quorum queues); MLPIPE_BROKER_URL.",
                "variables": {"host": {"default": "localhost:5672",
                                       "description": "host:port of a broker node"}},
            },
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"schemas": schemas, "messages": messages},
    }


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def write(path: Path, *, check: bool) -> int:
    """Write the document to ``path``; with ``check``, write nothing and return 1 when the
    file differs from what the code generates (CI's drift check)."""
    return write_or_check(path, render(document()), check=check,
                          regenerate="mlpipe contract asyncapi")


# --- pieces --------------------------------------------------------------------------------------

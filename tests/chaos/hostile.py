"""Malformed and adversarial messages, generated deterministically from a seed.

Every one must end in the dead-letter queue with a reason; none may crash a daemon or make
it fetch anything. The ``network`` category (one message in six when media URLs are given:
``tests/chaos/canary.py``) aims transcriptions at the canary server and its neighbours, every
URL at least once when there are enough messages.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

ROUTES = ("transcribe_whisper", "summarize_llm", "embed_vectors")

TRAVERSAL_URLS = [
    "file:///etc/passwd", "file://localhost/etc/shadow", "/etc/passwd", "../../etc/passwd",
    "./../../../root/.ssh/id_rsa", "file:///proc/self/environ", "ftp://127.0.0.1/x.mp4",
    "gopher://127.0.0.1:6379/_FLUSHALL", "data:audio/wav;base64,UklGRg==", "jar:file:///x!/y",
    "dict://127.0.0.1:11211/stat", "file:%2F%2F%2Fetc%2Fpasswd", "\\\\server\\share\\x.mp4",
    "/dev/zero", "sftp://host/x", "ldap://127.0.0.1/x",
]


@dataclass(frozen=True)
class Hostile:
    message_id: str
    routing_key: str
    body: bytes
    content_type: str | None
    kind: str
    #: For the ``network`` kind: what the media URL stands for (``canary.Target.label``).
    target: str = ""


def _valid(rng: random.Random, task_type: str) -> dict[str, Any]:
    payload: dict[str, Any] = (
        {"mediaUrl": "s3://chaos/ok.wav"} if task_type == "transcribe_whisper"
        else {"content": {"text": "some text long enough for a task " * 2}})
    return {"version": "1.0", "taskType": task_type, "shareId": f"h{rng.randrange(10**9)}",
            "payload": payload, "metadata": {"correlationId": "c", "timestamp": 1}}


#: Every this-many-th message is a ``network`` one when media URLs are given.
NETWORK_EVERY = 6


def generate(count: int, seed: int = 7,
             network: Sequence[tuple[str, str]] = ()) -> list[Hostile]:
    """``count`` messages; ``network`` is (label, media URL) pairs for the network
    category, used in turn."""
    rng = random.Random(seed)
    makers = [_junk, _not_object, _wrong_types, _bad_version, _bad_task_type, _traversal,
              _pickle, _missing_fields, _huge, _injection]
    out = []
    for i in range(count):
        if network and i % NETWORK_EVERY == NETWORK_EVERY - 1:
            label, url = network[(i // NETWORK_EVERY) % len(network)]
            doc = _valid(rng, "transcribe_whisper")
            doc["payload"]["mediaUrl"] = url
            out.append(Hostile(f"hostile-{i}", "transcribe_whisper", json.dumps(doc).encode(),
                               "application/json", "network", label))
            continue
        maker = makers[i % len(makers)]
        route = ROUTES[rng.randrange(len(ROUTES))]
        kind, body, ctype = maker(rng, route)
        if kind == "traversal":
            route = "transcribe_whisper"
        out.append(Hostile(f"hostile-{i}", route, body, ctype, kind))
    return out


Made = tuple[str, bytes, str | None]


def _junk(rng: random.Random, route: str) -> Made:
    return "junk", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))), \
        rng.choice([None, "application/json", "application/octet-stream"])


def _not_object(rng: random.Random, route: str) -> Made:
    return "not_object", rng.choice([b"[]", b"null", b"42", b'"a string"', b"[{}]",
                                     b"true"]), "application/json"


def _wrong_types(rng: random.Random, route: str) -> Made:
    doc = _valid(rng, route)
    field = rng.choice(["retryCount", "shareId", "payload", "timestamp", "correlationId"])
    if field == "retryCount":
        doc["metadata"]["retryCount"] = rng.choice(["1", -1, 1.5, None, [1]])
    elif field == "shareId":
        doc["shareId"] = rng.choice([123, None, "", {"a": 1}, "x" * 500])
    elif field == "payload":
        doc["payload"] = rng.choice(["text", [], 5, {"content": "not an object"}])
    elif field == "timestamp":
        doc["metadata"]["timestamp"] = rng.choice(["yesterday", -5, None])
    else:
        doc["metadata"]["correlationId"] = rng.choice([None, 7, ""])
    return "wrong_types", json.dumps(doc).encode(), "application/json"


def _bad_version(rng: random.Random, route: str) -> Made:
    doc = _valid(rng, route)
    doc["version"] = rng.choice(["2.0", "0.9", "abc", "", "1", "10.0", None, 1.0])
    return "bad_version", json.dumps(doc).encode(), "application/json"


def _bad_task_type(rng: random.Random, route: str) -> Made:
    doc = _valid(rng, route)
    doc["taskType"] = rng.choice(["translate", "", "TRANSCRIBE_WHISPER", "embed_vectors ",
                                  None, "rm -rf /", "__proto__"])
    return "bad_task_type", json.dumps(doc).encode(), "application/json"


def _traversal(rng: random.Random, route: str) -> Made:
    doc = _valid(rng, "transcribe_whisper")
    doc["payload"]["mediaUrl"] = rng.choice(TRAVERSAL_URLS)
    return "traversal", json.dumps(doc).encode(), "application/json"


def _pickle(rng: random.Random, route: str) -> Made:
    return "pickle", json.dumps(_valid(rng, route)).encode(), "application/x-python-serialize"


def _missing_fields(rng: random.Random, route: str) -> Made:
    doc = _valid(rng, route)
    victim = rng.choice(["payload", "metadata", "shareId", "taskType"])
    doc.pop(victim)
    return "missing_fields", json.dumps(doc).encode(), "application/json"


def _huge(rng: random.Random, route: str) -> Made:
    if rng.random() < 0.8:  # mostly deep nesting: cheap to send, hard to parse
        depth = rng.choice([10_000, 100_000])
        return "huge", b'{"a":' * depth + b"1" + b"}" * depth, "application/json"
    doc = _valid(rng, route)
    size = rng.choice([5 * 1024 * 1024, 3 * 1024 * 1024])
    if route == "transcribe_whisper":
        doc["payload"]["mediaUrl"] = "s3://chaos/" + "a" * 5000  # over the URL limit
    else:
        doc["payload"]["content"]["text"] = "x" * size  # over the text or body limit
    return "huge", json.dumps(doc).encode(), "application/json"


def _injection(rng: random.Random, route: str) -> Made:
    doc = _valid(rng, route)
    doc["shareId"] = rng.choice(["'; DROP TABLE ml_results; --", "../../x", "a b",
                                 "<script>", "\u0000nul", "x" * 200])
    return "injection", json.dumps(doc).encode(), "application/json"

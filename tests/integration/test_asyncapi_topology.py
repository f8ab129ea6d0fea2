"""``contracts/asyncapi.json`` against what the daemon really declares: the topology of the
default settings is declared into a fresh vhost, then the broker's own listing of exchanges,
queues (with their arguments) and bindings must be exactly what the document describes."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aio_pika

from mlpipe.broker.topology import declare
from mlpipe.producer import topology_from
from mlpipe.settings import Settings

DOC = Path(__file__).resolve().parents[2] / "contracts" / "asyncapi.json"


def _list(vhost: str, what: str, *columns: str) -> list[dict[str, Any]]:
    exe = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    out = subprocess.run([exe, "-q", what, "-p", vhost, *columns, "--formatter", "json"],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    rows: list[dict[str, Any]] = json.loads(out)
    return rows


async def test_document_matches_the_declared_topology(vhost: str, broker_url: str) -> None:
    conn = await aio_pika.connect(broker_url)
    try:
        await declare(await conn.channel(), topology_from(Settings.model_construct()))
    finally:
        await conn.close()
    doc = json.loads(DOC.read_text())
    channels = list(doc["channels"].values())
    amqp = [c["bindings"]["amqp"] for c in channels]

    exchanges = {e["name"]: e["type"] for e in _list(vhost, "list_exchanges", "name", "type")
                 if e["name"] and not e["name"].startswith("amq.")}
    documented_exchanges = {b["exchange"]["name"]: b["exchange"]["type"] for b in amqp
                            if b["is"] == "routingKey"}
    assert exchanges == documented_exchanges

    # rabbitmqctl lists arguments as [name, AMQP type, value] triples
    queues = {q["name"]: {arg[0]: arg[-1] for arg in q["arguments"]}
              for q in _list(vhost, "list_queues", "name", "arguments")}
    documented_queues = {c["address"]: c for c in channels
                         if c["bindings"]["amqp"]["is"] == "queue"}
    assert set(queues) == set(documented_queues)
    for name, channel in documented_queues.items():
        assert queues[name] == channel["x-mlpipe-queue-arguments"], name

    bindings = _list(vhost, "list_bindings", "source_name", "destination_name", "routing_key")
    bound = {(b["source_name"], b["destination_name"], b["routing_key"]) for b in bindings
             if b["source_name"]}
    tasks_bound = {(q, k) for s, q, k in bound if s == "mlpipe.tasks"}
    documented = {(c["address"], key) for c in channels
                  for key in c.get("x-mlpipe-routing-keys", [])}
    assert tasks_bound == documented
    # every routing key a producer is told to use reaches a queue
    task_keys = {c["address"] for c in channels if c["bindings"]["amqp"]["is"] == "routingKey"
                 and c["bindings"]["amqp"]["exchange"]["name"] == "mlpipe.tasks"}
    assert task_keys == {k for _, k in tasks_bound}
    # retries come back through mlpipe.retry, keyed by queue name, to every queue the
    # document's retry channel lists
    retry_targets = {q for s, q, k in bound if s == "mlpipe.retry" and q == k}
    assert retry_targets == set(doc["channels"]["retryExchange"]["parameters"]["queue"]["enum"])

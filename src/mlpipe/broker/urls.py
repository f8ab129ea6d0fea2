"""Broker URLs naming several hosts: the nodes of one RabbitMQ cluster.

``MLPIPE_BROKER_URL`` is an AMQP URL whose host part may list several ``host[:port]``
entries, comma-separated::

    amqp://user:pass@rabbit-0:5672,rabbit-1:5672,rabbit-2:5672/vhost?heartbeat=30

One URL rather than a separate list setting because the nodes of a cluster share everything
else in it: users, credentials and vhosts are cluster-wide, so a list of full URLs could only
add ways to disagree, and one secret (one environment variable) keeps carrying the whole
address as it always did. A URL with one host is used exactly as written.

AMQP client libraries take one host per URL, so nothing here connects: ``BrokerUrl.parse``
validates and splits, ``hosts`` yields one ordinary single-host URL per node, and the
connection supervisor (``mlpipe.broker.connection``) chooses among them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Default ports of the two schemes (RabbitMQ's, and the URI spec's).
DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671}

_HOSTNAME = re.compile(r"^[A-Za-z0-9_.%-]+$")
_IPV6 = re.compile(r"^[0-9A-Fa-f:.]+(%[A-Za-z0-9_.-]+)?$")


@dataclass(frozen=True)
class BrokerHost:
    """One node's address and the single-host URL that reaches it."""

    host: str
    port: int
    url: str

    @property
    def address(self) -> str:
        """``host:port`` (IPv6 in brackets): what logs and status show; never credentials."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class BrokerUrl:
    """A parsed broker URL: scheme, credentials, one or more hosts, vhost path and query."""

    raw: str
    scheme: str
    hosts: tuple[BrokerHost, ...]

    @classmethod
    def parse(cls, url: str) -> BrokerUrl:
        """Split ``url`` into its hosts; ``ValueError`` says what is wrong without repeating
        the URL (it holds a password)."""
        scheme, sep, rest = url.partition("://")
        scheme = scheme.lower()
        if not sep or scheme not in DEFAULT_PORTS:
            raise ValueError("broker URL must start with amqp:// or amqps://")
        cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
        netloc, tail = rest[:cut], rest[cut:]
        userinfo, at, hostlist = netloc.rpartition("@")
        if not hostlist.strip():
            raise ValueError("broker URL names no host")
        entries = hostlist.split(",")
        prefix = f"{scheme}://{userinfo}{at}"
        hosts: list[BrokerHost] = []
        for i, entry in enumerate(entries, 1):
            host, port = _host_port(entry.strip(), DEFAULT_PORTS[scheme], i, len(entries))
            shown = f"[{host}]" if ":" in host else host
            single = url if len(entries) == 1 else f"{prefix}{shown}:{port}{tail}"
            hosts.append(BrokerHost(host, port, single))
        seen: set[tuple[str, int]] = set()
        for h in hosts:
            if (h.host.lower(), h.port) in seen:
                raise ValueError(f"broker URL names {h.address} twice")
            seen.add((h.host.lower(), h.port))
        return cls(url, scheme, tuple(hosts))

    @property
    def addresses(self) -> list[str]:
        return [h.address for h in self.hosts]


def _host_port(entry: str, default_port: int, index: int, count: int) -> tuple[str, int]:
    where = f"host {index} of {count}" if count > 1 else "host"
    if not entry:
        raise ValueError(f"broker URL: {where} is empty (a stray comma?)")
    if entry.startswith("["):
        host, bracket, after = entry[1:].partition("]")
        if not bracket or not _IPV6.match(host):
            raise ValueError(f"broker URL: {where} is not a valid [IPv6] address")
        if after and not after.startswith(":"):
            raise ValueError(f"broker URL: {where} has text after its ']'")
        port_text = after[1:] if after else ""
    else:
        host, colon, port_text = entry.partition(":")
        if colon and not port_text:
            raise ValueError(f"broker URL: {where} has an empty port")
        if not _HOSTNAME.match(host):
            raise ValueError(f"broker URL: {where} is not a host name or address")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"broker URL: the port of {where} must be a number 1-65535")
    return host, int(port_text)

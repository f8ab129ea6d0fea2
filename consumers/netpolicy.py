"""Which network destinations a media fetch may dial.

A ``mediaUrl`` is written by whoever can publish to the broker, and the worker fetches it from
inside the cluster, next to the cloud metadata service, the databases and every internal
admin port. So by default a fetch dials only public unicast addresses, and the check is made
on the address actually dialled: ``GuardedResolver`` is the connector's resolver, so a name is
checked each time it is resolved for a connection (a name that answers a public address to a
pre-check and 127.0.0.1 to the connect gains nothing), and an IP literal in any spelling
(``2130706433``, ``0x7f000001``, ``0177.0.0.1``, ``127.1``, ``[::ffff:127.0.0.1]``) is
normalised and checked before any connection exists.

Deployments whose media lives on an internal host opt in explicitly: exact host names or
``*.suffix`` (``media_allowed_hosts``), or networks (``media_allow_private_networks``).

Every refusal is ``PermanentError(reason="forbidden_media_url")`` naming the rule and the
address, logged as ``media.refused``: dead-lettered at once, never retried, never fetched.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from mlpipe.errors import PermanentError
from mlpipe.settings import Settings

log = structlog.get_logger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

FORBIDDEN_REASON = "forbidden_media_url"


def _nets(*cidrs: str) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


#: Named ranges that are never a public media host, checked in this order so the log names
#: the most specific rule. Anything else that Python does not call global is refused as
#: ``not_global`` after these.
RULES: tuple[tuple[str, tuple[Network, ...]], ...] = (
    ("unspecified", _nets("0.0.0.0/8", "::/128")),
    ("loopback", _nets("127.0.0.0/8", "::1/128")),
    ("private", _nets("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")),
    ("link_local", _nets("169.254.0.0/16", "fe80::/10")),
    ("cloud_metadata", _nets("fd00:ec2::254/128")),
    ("carrier_grade_nat", _nets("100.64.0.0/10")),
    ("unique_local", _nets("fc00::/7", "fec0::/10")),
    ("multicast", _nets("224.0.0.0/4", "ff00::/8")),
    ("broadcast", _nets("255.255.255.255/32")),
    ("reserved", _nets("240.0.0.0/4", "192.0.0.0/24", "198.18.0.0/15", "192.0.2.0/24",
                       "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32", "100::/64")),
)
#: IPv6 ranges that carry an IPv4 address in their low 32 bits (compatible, NAT64); the
#: embedded address must pass too. Mapped (``::ffff:0:0/96``), 6to4 and Teredo are read with
#: ``ipaddress``'s own accessors.
_V4_EMBEDDING = _nets("::/96", "64:ff9b::/96", "64:ff9b:1::/48")


@dataclass(frozen=True)
class Refusal:
    rule: str
    address: str


def classify(ip: IPAddress) -> str | None:
    """The rule that forbids ``ip`` as a media host, or None for a public unicast address.
    An IPv6 address that embeds an IPv4 one is judged by both."""
    if isinstance(ip, ipaddress.IPv6Address):
        for embedded in _embedded_v4(ip):
            rule = classify(embedded)
            if rule is not None:
                return f"{rule}_embedded_in_ipv6"
    for name, nets in RULES:
        if any(ip in net for net in nets if net.version == ip.version):
            return name
    return None if ip.is_global else "not_global"


def _embedded_v4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    out = [a for a in (ip.ipv4_mapped, ip.sixtofour) if a is not None]
    if ip.teredo is not None:
        out.extend(ip.teredo)
    if ip.ipv4_mapped is None and int(ip) > 1 and any(ip in net for net in _V4_EMBEDDING):
        out.append(ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF))
    return out


def parse_ip_host(host: str) -> IPAddress | None:
    """``host`` as an IP address if it spells one in any form a resolver would accept, else
    None (a name). IPv4 follows ``inet_aton`` (and the WHATWG URL standard): one to four
    parts, each decimal, ``0x`` hex or leading-zero octal, the last filling the remaining
    bytes, so ``2130706433``, ``0x7f.1`` and ``0177.0.0.1`` are all 127.0.0.1. A host that
    looks numeric but is not a valid address is refused rather than handed to a resolver
    that may read it some other way."""
    text = host.strip().rstrip(".").lower()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if ":" in text:
        try:
            return ipaddress.IPv6Address(text.split("%", 1)[0])
        except ValueError as exc:
            raise PermanentError(f"media host {host!r} is not a valid IPv6 address",
                                 reason=FORBIDDEN_REASON) from exc
    parts = text.split(".")
    if not text or not _numeric_part(parts[-1]):
        return None
    values = [_ipv4_part(host, p) for p in parts]
    if len(values) > 4 or any(v > 255 for v in values[:-1]) \
            or values[-1] >= 256 ** (5 - len(values)):
        raise PermanentError(f"media host {host!r} is not a valid IPv4 address",
                             reason=FORBIDDEN_REASON)
    number = 0
    for v in values[:-1]:
        number = number << 8 | v
    number = number << 8 * (5 - len(values)) | values[-1]
    return ipaddress.IPv4Address(number)


def _numeric_part(part: str) -> bool:
    if part.startswith("0x"):
        return all(c in "0123456789abcdef" for c in part[2:])
    return part.isdigit()


def _ipv4_part(host: str, part: str) -> int:
    try:
        if part.startswith("0x"):
            return int(part[2:] or "0", 16)
        if len(part) > 1 and part.startswith("0"):
            return int(part, 8)
        return int(part, 10)
    except ValueError as exc:
        raise PermanentError(f"media host {host!r} is not a valid IPv4 address",
                             reason=FORBIDDEN_REASON) from exc


class DestinationPolicy:
    """The deployment's rules for media hosts, built once from the settings."""

    def __init__(self, settings: Settings) -> None:
        self._exact = frozenset(h for h in settings.media_allowed_hosts if not h.startswith("*."))
        self._suffixes = tuple(h[1:] for h in settings.media_allowed_hosts if h.startswith("*."))
        self._networks = tuple(ipaddress.ip_network(n, strict=False)
                               for n in settings.media_allow_private_networks)

    def host_allowed(self, host: str) -> bool:
        """An operator vouched for this host name: any address it resolves to may be dialled."""
        name = host.strip().rstrip(".").lower()
        ip = parse_ip_host(name)
        if ip is not None:
            name = str(ip)
        return name in self._exact or any(name.endswith(s) for s in self._suffixes)

    def refusal(self, ip: IPAddress) -> Refusal | None:
        if any(ip.version == net.version and ip in net for net in self._networks):
            return None
        rule = classify(ip)
        return Refusal(rule, str(ip)) if rule else None

    def check_host(self, url: str, host: str) -> None:
        """The checks that need no DNS: an IP literal in any spelling, and names that are
        local by definition. Names are checked again, address by address, when resolved."""
        ip = parse_ip_host(host)
        allowed = self.host_allowed(host)
        if ip is None:
            name = host.rstrip(".").lower()
            if not allowed and (name == "localhost" or name.endswith(".localhost")):
                raise refused(url, host, Refusal("loopback_name", name))
            return
        if not allowed:
            self._raise_if_refused(url, host, ip)
        if ip.version == 4 and host != str(ip):
            # Allowed or not, a legacy spelling (0x7f.1, 2130706433) has no honest use and
            # resolvers disagree on it: only dotted-quad IPv4 literals are dialled.
            raise PermanentError(f"media host {host!r} is not a dotted-quad IPv4 address",
                                 reason="invalid_media_url")

    def check_resolved(self, host: str, addresses: list[str]) -> None:
        """All of a name's addresses must pass: a name with a public and a private record
        is a rebinding attempt, not a choice."""
        if self.host_allowed(host):
            return
        for address in addresses:
            self._raise_if_refused(host, host, ipaddress.ip_address(address.split("%", 1)[0]))

    def _raise_if_refused(self, url: str, host: str, ip: IPAddress) -> None:
        refusal = self.refusal(ip)
        if refusal is not None:
            raise refused(url, host, refusal)


#: What an operator can do about a refusal of an address (the only refusals an opt-in lifts).
ADDRESS_HINT = ("opt in with MLPIPE_MEDIA_ALLOWED_HOSTS or MLPIPE_MEDIA_ALLOW_PRIVATE_NETWORKS "
                "if it is yours")


def refused(url: str, host: str, refusal: Refusal, hint: str = ADDRESS_HINT) -> PermanentError:
    """The refusal as the error that dead-letters the task, logged once with its rule."""
    log.warning("media.refused", url=url[:300], host=host[:255], rule=refusal.rule,
                address=refusal.address)
    return PermanentError(
        f"media URL {url[:300]!r} refused: {host[:255]!r} -> {refusal.address} "
        f"({refusal.rule.replace('_', ' ')})" + (f"; {hint}" if hint else ""),
        reason=FORBIDDEN_REASON)


class GuardedResolver(AbstractResolver):
    """The connector's resolver: resolves with the system resolver and refuses the host
    unless every address passes the policy, so what is dialled is what was checked. Used
    with ``use_dns_cache=False``: each connection resolves (and is checked) afresh."""

    def __init__(self, policy: DestinationPolicy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._inner = inner or ThreadedResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        # A numeric spelling aiohttp did not recognise as a literal reaches us here too: it
        # is dialled as the address it spells, never handed to a resolver that may read it
        # differently.
        self._policy.check_host(host, host)
        ip = parse_ip_host(host)
        if ip is not None:
            fam = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            return [{"hostname": host, "host": str(ip), "port": port, "family": fam,
                     "proto": 0, "flags": 0}]
        results = await self._inner.resolve(host, port, family)
        self._policy.check_resolved(host, [r["host"] for r in results])
        return results

    async def close(self) -> None:
        await self._inner.close()


def connector_kwargs(policy: DestinationPolicy,
                     resolver: AbstractResolver | None = None) -> dict[str, Any]:
    """Arguments for ``aiohttp.TCPConnector`` that route every dial through the policy."""
    return {"resolver": GuardedResolver(policy, resolver), "use_dns_cache": False}

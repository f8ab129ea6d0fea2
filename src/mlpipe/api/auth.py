"""Bearer tokens, and the rule that an API without tokens stays on loopback.

Two kinds of token: ordinary ones read search, results and workflow state; admin ones also
read the cost and budget analytics (who spent what is not every caller's business). Presented
tokens are compared by their SHA-256 digests with ``hmac.compare_digest`` against every
configured token, without stopping at the first match, so neither the time taken nor the
token lengths tell an attacker how close a guess was.

With no token configured at all the read endpoints answer everyone, which is only acceptable
when no one else can reach them: ``ensure_safe_bind`` refuses any address that is not
loopback. The admin endpoints answer no one in that mode (403, ``mlpipe.api.dispatch``):
loopback is shared by every process and user of the machine, and the ledger is not theirs.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import socket
from collections.abc import Iterable
from enum import StrEnum

from mlpipe.errors import ApiConfigError

#: Shorter tokens are guessable; refusing them at start-up beats finding out later.
MIN_TOKEN_LENGTH = 16

__all__ = ["MIN_TOKEN_LENGTH", "Access", "ApiConfigError", "Role", "TokenSet",
           "ensure_safe_bind", "is_loopback"]


class Access(StrEnum):
    PUBLIC = "public"
    READ = "read"
    ADMIN = "admin"


class Role(StrEnum):
    READER = "reader"
    ADMIN = "admin"


class TokenSet:
    def __init__(self, tokens: Iterable[str], admin_tokens: Iterable[str]) -> None:
        self._readers = [_digest(t) for t in _checked(tokens, "token")]
        self._admins = [_digest(t) for t in _checked(admin_tokens, "admin token")]

    @property
    def enabled(self) -> bool:
        return bool(self._readers or self._admins)

    def role(self, presented: str) -> Role | None:
        digest = _digest(presented)
        admin = reader = False
        for known in self._admins:
            admin |= hmac.compare_digest(known, digest)
        for known in self._readers:
            reader |= hmac.compare_digest(known, digest)
        if admin:
            return Role.ADMIN
        return Role.READER if reader else None


def _checked(tokens: Iterable[str], what: str) -> list[str]:
    out = list(tokens)
    for token in out:
        if len(token) < MIN_TOKEN_LENGTH or token != token.strip():
            raise ApiConfigError(f"an API {what} is shorter than {MIN_TOKEN_LENGTH} characters "
                                 "or has surrounding whitespace")
    return out


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def is_loopback(host: str) -> bool:
    """True when every address ``host`` binds to is a loopback address. An empty host or a
    wildcard (0.0.0.0, ::) binds to every interface."""
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None,
                                                             type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ApiConfigError(f"cannot resolve the API host {host!r}: {exc}") from exc
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


async def ensure_safe_bind(host: str, tokens: TokenSet) -> None:
    if tokens.enabled or await is_loopback(host):
        return
    raise ApiConfigError(
        f"refusing to serve the API on {host or 'every interface'!s} without tokens: anyone "
        "who can reach it could read every stored result and search every stored text. "
        "Configure MLPIPE_API_TOKENS and/or MLPIPE_API_ADMIN_TOKENS (JSON lists), or bind to "
        "127.0.0.1")

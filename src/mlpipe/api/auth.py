"""Bearer tokens, and the rule that an API without tokens stays on loopback.

Two kinds of token: ordinary ones read search, results and workflow state; admin ones also
read the cost and budget analytics (who spent what is not every caller's business). Presented
tokens are compared by their SHA-256 digests with ``hmac.compare_digest`` against every
configured token, without stopping at the first match, so neither the time taken nor the
token lengths tell an attacker how close a guess was.

With no token configured at all the read endpoints answer everyone, which is only acceptable
when no one else can reach them: ``ensure_safe_bind`` refuses any address that is not
loopback. The admin endpoints answer no one in that mode (403, ``authorize``): loopback is
shared by every process and user of the machine, and the ledger is not theirs.

The console (``mlpipe.api.ui``) checks the same tokens, carried in a cookie instead of the
``Authorization`` header; both go through ``TokenSet.role``.
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

from .context import ApiError

#: Shorter tokens are guessable; refusing them at start-up beats finding out later.
MIN_TOKEN_LENGTH = 16

__all__ = ["MIN_TOKEN_LENGTH", "SESSION_COOKIE", "Access", "ApiConfigError", "Role",
           "TokenSet", "authorize", "ensure_safe_bind", "is_loopback"]

#: The console's login cookie: the token itself, HttpOnly, SameSite=Strict.
SESSION_COOKIE = "mlpipe_token"
_CHALLENGE = 'Bearer realm="mlpipe"'


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


def authorize(header: str | None, access: Access, tokens: TokenSet) -> Role | None:
    """Raise 401/403 unless ``header`` grants ``access``; the caller's role when it has one.

    Without any configured token (only allowed on loopback) the read endpoints answer
    everyone and the admin ones no one (403): no token can prove a caller is an admin, and
    "it runs on loopback" says nothing about who else shares the machine."""
    if access is Access.PUBLIC:
        return None
    if not tokens.enabled:
        if access is Access.ADMIN:
            raise ApiError(403, "forbidden", "this endpoint needs an admin token and none is "
                                             "configured (MLPIPE_API_ADMIN_TOKENS)")
        return Role.READER
    if not header:
        raise ApiError(401, "unauthorized", "a bearer token is required",
                       headers={"WWW-Authenticate": _CHALLENGE})
    scheme, _, token = header.partition(" ")
    role = tokens.role(token.strip()) if scheme.lower() == "bearer" else None
    if role is None:
        raise ApiError(401, "unauthorized", "invalid bearer token",
                       headers={"WWW-Authenticate": f'{_CHALLENGE}, error="invalid_token"'})
    if access is Access.ADMIN and role is not Role.ADMIN:
        raise ApiError(403, "forbidden", "this endpoint needs an admin token")
    return role


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

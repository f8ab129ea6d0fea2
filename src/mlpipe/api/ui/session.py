"""Who is using the console: the token from the login form, kept in an HttpOnly,
SameSite=Strict cookie, and the CSRF token every form post must carry.

The cookie holds the token itself (checked on every request like a bearer header, so revoking
a token in the configuration logs its sessions out on their next click). SameSite=Strict keeps
other sites' pages from sending it; the CSRF token is a second, independent guard for the one
state-changing action (replaying dead letters): an HMAC of the cookie's token under a key this
process draws at start, so a page on another origin can neither read nor forge it.

Without configured tokens (loopback only) there is nothing to log in with: every visitor reads,
and no one is admin, as on the JSON endpoints.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from fastapi import Request

from ..auth import SESSION_COOKIE, Role, TokenSet

#: A session lasts a working day; the token stays valid, only the cookie expires.
COOKIE_MAX_AGE_S = 12 * 3600
_KEY = secrets.token_bytes(32)


@dataclass(frozen=True)
class Visitor:
    role: Role | None
    #: The token the cookie carries ("" without tokens configured).
    token: str
    #: Tokens are configured at all (else: loopback, reads open, admin closed).
    tokens_enabled: bool

    @property
    def signed_in(self) -> bool:
        return self.role is not None

    @property
    def admin(self) -> bool:
        return self.role is Role.ADMIN

    @property
    def csrf(self) -> str:
        return hmac.new(_KEY, b"csrf:" + self.token.encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(self.csrf, presented)


def visitor(request: Request) -> Visitor:
    tokens: TokenSet = request.app.state.tokens
    if not tokens.enabled:
        return Visitor(Role.READER, "", False)
    token = request.cookies.get(SESSION_COOKIE, "")
    role = tokens.role(token) if token else None
    return Visitor(role, token if role else "", True)


def secure_cookie(request: Request) -> bool:
    """``Secure`` whenever the page came over HTTPS (behind a TLS proxy that says so)."""
    return request.url.scheme == "https" or \
        request.headers.get("x-forwarded-proto", "").lower() == "https"

"""Opaque page cursors.

A cursor carries the position where the next page starts (an offset into a ranked list, or
the last id seen in a keyset walk) and a fingerprint of the filters it was issued for. Reusing
it with other filters is refused: the position would point into a different list, and a
client that changed filters mid-walk has a bug it should hear about. Cursors are not signed:
forging one only lets a caller jump to a position it could have paged to anyway.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any

from pydantic import BaseModel

_VERSION = 1
#: Parameters that may change between pages without invalidating a cursor.
_FREE = frozenset({"cursor", "limit"})
#: Positions are offsets or bigint ids; anything larger cannot have been issued.
_MAX_POSITION = 2**63 - 1


class CursorError(ValueError):
    """The cursor was not issued by this API for this operation and these filters."""


def fingerprint(kind: str, *params: BaseModel) -> str:
    """Identity of a listing: the operation and every filter, except the page size."""
    filters: dict[str, Any] = {"kind": kind}
    for model in params:
        dumped = model.model_dump(mode="json", by_alias=True)
        filters.update({k: v for k, v in dumped.items() if k not in _FREE})
    canonical = json.dumps(filters, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


def encode(fp: str, position: int) -> str:
    raw = json.dumps({"v": _VERSION, "f": fp, "p": position}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode(token: str, fp: str) -> int:
    """The position in ``token``, which must have been issued for fingerprint ``fp``."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        doc = json.loads(raw)
    except (binascii.Error, ValueError) as exc:
        raise CursorError("not a cursor issued by this API") from exc
    if not isinstance(doc, dict) or doc.get("v") != _VERSION:
        raise CursorError("not a cursor issued by this API")
    position = doc.get("p")
    if not isinstance(position, int) or isinstance(position, bool) \
            or not 0 <= position <= _MAX_POSITION:
        raise CursorError("not a cursor issued by this API")
    if doc.get("f") != fp:
        raise CursorError("this cursor belongs to a listing with other filters; "
                          "start again without a cursor")
    return position

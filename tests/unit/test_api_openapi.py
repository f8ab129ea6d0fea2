"""The read API's contract without a server: the checked-in OpenAPI document is exactly what
the models generate (drift fails here), it is valid OpenAPI 3.1, and the pieces that guard the
API (tokens, the loopback rule, cursors) behave on their own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from openapi_spec_validator import validate

from mlpipe.api import cursor
from mlpipe.api.app import contract as document
from mlpipe.api.auth import (
    Access,
    ApiConfigError,
    Role,
    TokenSet,
    authorize,
    ensure_safe_bind,
    is_loopback,
)
from mlpipe.api.context import ApiError
from mlpipe.api.docs import render
from mlpipe.api.models import CostsQuery, SearchQuery

ROOT = Path(__file__).resolve().parents[2]
OPENAPI_FILE = ROOT / "contracts" / "openapi.json"
ADMIN_PATHS = {"/v1/costs/summary", "/v1/costs", "/v1/tasks/summary", "/v1/budgets"}


def test_checked_in_openapi_matches_the_models() -> None:
    assert OPENAPI_FILE.is_file(), "run: mlpipe contract openapi"
    assert OPENAPI_FILE.read_text(encoding="utf-8") == render(document()), (
        "contracts/openapi.json differs from the models: run `mlpipe contract openapi`")


def test_openapi_is_valid_3_1() -> None:
    doc = document()
    validate(doc)
    assert doc["openapi"] == "3.1.0"
    operations = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert operations == {("GET", p) for p in (
        "/v1/search", "/v1/shares/{shareId}/similar", "/v1/shares/{shareId}/results",
        "/v1/shares/{shareId}/workflow", "/v1/costs/summary", "/v1/costs", "/v1/tasks/summary",
        "/v1/budgets", "/healthz", "/v1/events")}
    admin = {p for p, ops in doc["paths"].items() if ops["get"]["x-mlpipe-access"] == "admin"}
    assert admin == ADMIN_PATHS
    for path in ADMIN_PATHS:
        assert "403" in doc["paths"][path]["get"]["responses"]
    assert doc["paths"]["/healthz"]["get"]["security"] == []
    events = doc["paths"]["/v1/events"]["get"]
    assert list(events["responses"]["200"]["content"]) == ["text/event-stream"]
    assert events["responses"]["401"]["content"] == {
        "application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    search = {p["name"]: p for p in doc["paths"]["/v1/search"]["get"]["parameters"]}
    assert search["q"]["required"] is True
    assert search["q"]["schema"]["maxLength"] == 1000
    assert search["limit"]["schema"]["maximum"] == 100
    assert "null" not in json.dumps(search["platform"]["schema"])  # optional, not nullable


def test_openapi_command(tmp_path: Path) -> None:
    """``mlpipe contract openapi`` writes the document, and ``--check`` fails on a stale one
    (what CI or a pre-commit hook runs)."""
    target = tmp_path / "openapi.json"
    command = [sys.executable, "-m", "mlpipe.cli", "contract", "openapi", str(target)]
    assert subprocess.run(command, capture_output=True, timeout=60).returncode == 0
    assert target.read_text(encoding="utf-8") == render(document())
    assert subprocess.run([*command, "--check"], capture_output=True, timeout=60).returncode == 0
    target.write_text("{}\n", encoding="utf-8")
    stale = subprocess.run([*command, "--check"], capture_output=True, text=True, timeout=60)
    assert stale.returncode == 1
    assert "out of date" in stale.stderr


# --- tokens and the loopback rule -----------------------------------------------------------------

READER, ADMIN = "r" * 16 + "-reader", "a" * 16 + "-admin"


def test_token_roles() -> None:
    tokens = TokenSet([READER], [ADMIN])
    assert tokens.enabled
    assert tokens.role(READER) is Role.READER
    assert tokens.role(ADMIN) is Role.ADMIN
    for wrong in ("", READER[:-1], READER + "x", ADMIN.upper(), "Bearer " + READER):
        assert tokens.role(wrong) is None, wrong
    assert not TokenSet([], []).enabled
    with pytest.raises(ApiConfigError, match="shorter than 16"):
        TokenSet(["short"], [])
    with pytest.raises(ApiConfigError, match="whitespace"):
        TokenSet([], [f" {ADMIN}"])


def test_without_tokens_reads_are_open_and_admin_is_closed() -> None:
    """The loopback-only mode: no token configured, so nothing can prove a caller is an
    admin; read and public access pass, admin access is 403 whatever is presented."""
    none = TokenSet([], [])
    for header in (None, f"Bearer {ADMIN}", "Bearer anything-at-all-0000", "Basic x"):
        authorize(header, Access.PUBLIC, none)
        authorize(header, Access.READ, none)
        with pytest.raises(ApiError) as refused:
            authorize(header, Access.ADMIN, none)
        assert (refused.value.status, refused.value.error) == (403, "forbidden")
        assert "MLPIPE_API_ADMIN_TOKENS" in refused.value.message
    configured = TokenSet([READER], [ADMIN])
    authorize(f"Bearer {ADMIN}", Access.ADMIN, configured)
    with pytest.raises(ApiError) as anonymous:
        authorize(None, Access.READ, configured)
    assert anonymous.value.status == 401


async def test_loopback_rule() -> None:
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert await is_loopback(host), host
        await ensure_safe_bind(host, TokenSet([], []))
    for host in ("0.0.0.0", "::", ""):
        assert not await is_loopback(host), host
        with pytest.raises(ApiConfigError, match="refusing to serve the API"):
            await ensure_safe_bind(host, TokenSet([], []))
        await ensure_safe_bind(host, TokenSet([READER], []))  # with tokens: fine


# --- cursors --------------------------------------------------------------------------------------


def test_cursor_round_trip_and_binding() -> None:
    query = SearchQuery.model_validate({"q": "orbit", "platform": "youtube", "limit": "5"})
    fp = cursor.fingerprint("search", query)
    token = cursor.encode(fp, 40)
    assert cursor.decode(token, fp) == 40
    # the page size may change between pages; the filters may not
    resized = SearchQuery.model_validate({"q": "orbit", "platform": "youtube", "limit": "50",
                                          "cursor": token})
    assert cursor.fingerprint("search", resized) == fp
    other = SearchQuery.model_validate({"q": "orbit", "platform": "tiktok"})
    with pytest.raises(cursor.CursorError, match="other filters"):
        cursor.decode(token, cursor.fingerprint("search", other))
    with pytest.raises(cursor.CursorError):  # same filters, another operation
        cursor.decode(token, cursor.fingerprint("costs", CostsQuery.model_validate({})))


@pytest.mark.parametrize("forged", [
    "", "!!!", "bm90LWEtY3Vyc29y",  # "not-a-cursor"
    cursor.encode("x", 1)[:-2],
    "eyJ2IjoxLCJmIjoiZiIsInAiOi0xfQ",  # {"v":1,"f":"f","p":-1}
    "eyJ2IjoxLCJmIjoiZiIsInAiOnRydWV9",  # {"v":1,"f":"f","p":true}
    "eyJ2IjoyLCJmIjoiZiIsInAiOjF9",  # {"v":2,"f":"f","p":1}
    "eyJ2IjoxLCJmIjoiZiIsInAiOjkyMjMzNzIwMzY4NTQ3NzU4MDh9",  # p = 2**63
])
def test_forged_cursors_are_refused(forged: str) -> None:
    with pytest.raises(cursor.CursorError):
        cursor.decode(forged, "f")

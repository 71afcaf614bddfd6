"""Who may call what, and what no caller may do: API keys with scopes, limits, malformed requests.

Against the real Postgres: every route refuses a missing, unknown, revoked and under-scoped key with
a reason; the open routes stay open; a too-large body, a busy box and a flood of /init are refused
with their reason; every malformed request is a 4xx, never a 500.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from core.api_keys import Scope, create_key, revoke_key
from core.settings import Settings
from tests.databases import scratch_database
from tests.running_services import running_api

pytestmark = pytest.mark.integration

STREAM = str(uuid.uuid4())
# (method, path, JSON body, the scope it needs)
PROTECTED = [
    ("POST", "/init", {"url": "rtsp://camera.test/live"}, Scope.ADMIN),
    ("POST", "/shutdown", {"id": STREAM}, Scope.ADMIN),
    ("GET", f"/state/{STREAM}", None, Scope.READ),
    ("GET", f"/state?id={STREAM}", None, Scope.READ),
    ("GET", "/streams", None, Scope.READ),
    ("GET", f"/detection_result?id={STREAM}", None, Scope.READ),
    ("POST", "/keys", {"name": "x", "scope": "read"}, Scope.ADMIN),
    ("GET", "/keys", None, Scope.ADMIN),
    ("DELETE", f"/keys/{uuid.uuid4()}", None, Scope.ADMIN),
]


@pytest.fixture
async def anonymous(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with running_api(settings, scope=None) as client:
        yield client


def call(client: httpx.AsyncClient, method: str, path: str, body: object, token: str | None):  # type: ignore[no-untyped-def]
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return client.request(method, path, json=body, headers=headers)


@pytest.mark.parametrize(
    ("method", "path", "body", "needs"), PROTECTED, ids=[f"{m} {p}" for m, p, _, _ in PROTECTED]
)
async def test_every_route_refuses_a_missing_unknown_revoked_or_under_scoped_key_saying_why(
    anonymous: httpx.AsyncClient, db_pool: asyncpg.Pool, method: str, path: str, body: object, needs: Scope
) -> None:
    missing = await call(anonymous, method, path, body, None)
    assert missing.status_code == 401 and "missing API key" in missing.json()["detail"]
    assert missing.headers["WWW-Authenticate"] == "Bearer"

    unknown = await call(anonymous, method, path, body, "lk_not-a-key")
    assert unknown.status_code == 401 and unknown.json()["detail"] == "unknown or revoked API key"

    revoked, token = await create_key(db_pool, name="to revoke", scope=Scope.ADMIN)
    await revoke_key(db_pool, revoked.id)
    gone = await call(anonymous, method, path, body, token)
    assert gone.status_code == 401 and gone.json()["detail"] == "unknown or revoked API key"

    _reader, read_token = await create_key(db_pool, name="reader", scope=Scope.READ)
    as_reader = await call(anonymous, method, path, body, read_token)
    if needs is Scope.ADMIN:
        assert as_reader.status_code == 403
        assert as_reader.json()["detail"] == "this key's scope is read; this call needs admin"
    else:
        assert as_reader.status_code not in (401, 403), as_reader.text


async def test_health_readiness_metrics_and_the_page_need_no_key(anonymous: httpx.AsyncClient) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/", "/static/app.js", "/openapi.json"):
        response = await anonymous.get(path)
        assert response.status_code not in (401, 403), (path, response.status_code)


async def test_a_created_key_is_shown_once_listed_without_its_token_and_refused_once_revoked(
    api: httpx.AsyncClient, anonymous: httpx.AsyncClient
) -> None:
    created = await api.post("/keys", json={"name": "dashboard", "scope": "read"})
    assert created.status_code == 201, created.text
    key = created.json()
    assert key["token"].startswith("lk_") and key["scope"] == "read"
    headers = {"Authorization": f"Bearer {key['token']}"}
    assert (await anonymous.get("/streams", headers=headers)).status_code == 200

    listed = (await api.get("/keys")).json()["keys"]
    mine = next(k for k in listed if k["id"] == key["id"])
    assert "token" not in mine and key["token"] not in str(listed)
    assert mine["prefix"] == key["token"][:10] and mine["revoked_at"] is None

    revoked = await api.delete(f"/keys/{key['id']}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    assert (await anonymous.get("/streams", headers=headers)).status_code == 401
    assert (await api.delete(f"/keys/{uuid.uuid4()}")).status_code == 404


async def test_a_body_over_the_limit_is_refused_with_413(settings: Settings) -> None:
    async with running_api(settings.model_copy(update={"max_request_bytes": 1024})) as api:
        declared = await api.post("/init", json={"url": "rtsp://camera.test/" + "a" * 2000})
        assert declared.status_code == 413 and "over 1024 bytes" in declared.json()["detail"]

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
            yield b'{"url": "rtsp://camera.test/'
            for _ in range(40):
                yield b"a" * 100
            yield b'"}'

        streamed = await api.post("/init", content=chunks(), headers={"Content-Type": "application/json"})
        assert streamed.status_code == 413


async def test_init_beyond_the_active_stream_cap_answers_503_with_the_reason(
    settings: Settings, pg_admin_url: str
) -> None:
    with scratch_database(pg_admin_url, "lookout_cap") as url:
        capped = settings.model_copy(
            update={"database_url": type(settings.database_url)(url), "max_active_streams": 2}
        )
        async with running_api(capped) as api:
            for n in range(2):
                assert (await api.post("/init", json={"url": f"rtsp://camera.test/{n}"})).status_code == 202
            refused = await api.post("/init", json={"url": "rtsp://camera.test/third"})
            assert refused.status_code == 503
            assert refused.json()["detail"] == (
                "2 streams are active and this box runs at most 2 (LOOKOUT_MAX_ACTIVE_STREAMS)"
            )
            first = (await api.get("/streams")).json()["streams"][0]["id"]
            pool = await asyncpg.connect(url)
            try:  # one of them ends: there is room again
                await pool.execute("UPDATE streams SET state = 'inactive' WHERE id = $1", uuid.UUID(first))
            finally:
                await pool.close()
            assert (await api.post("/init", json={"url": "rtsp://camera.test/third"})).status_code == 202


async def test_init_faster_than_the_rate_limit_of_a_key_answers_429_with_retry_after(
    settings: Settings,
) -> None:
    async with running_api(settings.model_copy(update={"init_rate_per_minute": 3})) as api:
        codes = [
            (await api.post("/init", json={"url": f"rtsp://camera.test/r{n}"})).status_code for n in range(4)
        ]
        assert codes == [202, 202, 202, 429]
        refused = await api.post("/init", json={"url": "rtsp://camera.test/r9"})
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["detail"] == "more than 3 /init calls a minute with this key"


@pytest.mark.parametrize(
    "classes_json",
    ['["per\\u0000son"]', '["\\ud800"]'],
    ids=["NUL character", "lone surrogate"],
)
async def test_text_that_postgres_cannot_store_is_a_422_with_a_reason(
    api: httpx.AsyncClient, classes_json: str
) -> None:
    body = f'{{"url": "rtsp://camera.test/live", "options": {{"classes": {classes_json}}}}}'
    response = await api.post("/init", content=body.encode(), headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail[0]["loc"][:3] == ["body", "options", "classes"]
    assert "cannot be stored" in detail[0]["msg"] or "not valid Unicode" in detail[0]["msg"]


@pytest.mark.parametrize(
    "cursor",
    ["9223372036854775808", "9999999999999999999", "1" * 30, "²", "9" * 5000, "-1", "1e3", " 12"],
)
async def test_a_cursor_that_is_not_a_plain_int64_decimal_is_a_422_with_a_reason(
    api: httpx.AsyncClient, cursor: str
) -> None:
    response = await api.get("/detection_result", params={"id": STREAM, "cursor": cursor})
    assert response.status_code == 422, response.text
    [problem] = response.json()["detail"]
    assert problem["loc"] == ["query", "cursor"] and "whole number from 0 to 2^63-1" in problem["msg"]


async def test_the_page_sends_a_content_security_policy_allowing_only_itself_and_the_s3_links(
    anonymous: httpx.AsyncClient, settings: Settings
) -> None:
    response = await anonymous.get("/")
    policy = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy
    assert f"img-src 'self' data: http://{settings.s3_endpoint}" in policy
    assert "frame-ancestors 'none'" in policy

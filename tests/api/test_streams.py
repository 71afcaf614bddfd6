"""POST /init, POST /shutdown, GET /state and GET /streams against the real Postgres."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from pathlib import Path

import asyncpg
import httpx
import pytest

from core.messages import StateEvent, parse_command
from core.sealing import UrlSealer
from core.settings import Settings
from core.states import StreamState
from tests.conftest import make_settings
from tests.ports import free_port
from tests.running_services import running_api
from tests.stream_rows import add_streams

pytestmark = pytest.mark.integration

SECRET = f"pw-{uuid.uuid4().hex[:12]}"


def camera_url(name: str = "live", *, credentials: bool = False) -> str:
    userinfo = f"admin:{SECRET}@" if credentials else ""
    return f"rtsp://{userinfo}camera.test:8554/{name}-{uuid.uuid4().hex[:8]}"


async def outbox_rows(db_pool: asyncpg.Pool, stream_id: str) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await db_pool.fetch(
        "SELECT topic, key, payload FROM outbox WHERE key = $1 ORDER BY id", stream_id
    )
    return rows


async def test_init_stores_stream_audit_and_both_outbox_messages(
    api: httpx.AsyncClient, db_pool: asyncpg.Pool, settings: Settings
) -> None:
    url = camera_url(credentials=True)
    response = await api.post("/init", json={"url": url, "options": {"fps": 2, "classes": ["person"]}})

    assert response.status_code == 202, response.text
    body = response.json()
    stream_id = body["id"]
    assert body["state"] == "init_startup"
    assert body["url_redacted"] == url.replace(f"admin:{SECRET}@", "***@")
    assert body["options"] == {
        "fps": 2.0,
        "confidence": None,
        "classes": ["person"],
        "imgsz": None,
        "backend": None,
        "precision": None,
        "model": None,
        "motion_gating": False,
        "motion_max_skip_s": None,
        "zones": None,
        "lines": None,
        "track": None,
        "store": None,
        "store_every_s": None,
        "retention": None,
        "webhook_url": None,
    }
    assert body["storage"] is None and body["deleting"] is False
    assert body["workflow_id"] == f"stream-{stream_id}"
    assert SECRET not in response.text

    row = await db_pool.fetchrow(
        "SELECT url_full, state, version FROM streams WHERE id = $1", uuid.UUID(stream_id)
    )
    assert (row["state"], row["version"]) == ("init_startup", 1)
    # sealed at rest: only the runner opens it
    assert SECRET not in row["url_full"] and UrlSealer(settings).open(row["url_full"]) == url
    audit = await db_pool.fetch(
        "SELECT to_state, version, source FROM stream_events WHERE stream_id = $1", uuid.UUID(stream_id)
    )
    assert [tuple(r) for r in audit] == [("init_startup", 1, "api")]

    command_row, event_row = await outbox_rows(db_pool, stream_id)
    assert command_row["topic"] == settings.topic_commands
    command = parse_command(command_row["payload"])
    assert command.kind == "start" and command.options.fps == 2
    assert SECRET not in command_row["payload"].decode(), "the start command carries the URL sealed"
    assert UrlSealer(settings).open(command.url_sealed) == url
    assert event_row["topic"] == settings.topic_states
    event = StateEvent.model_validate_json(event_row["payload"])
    assert (event.stream_id, event.service, event.kind, event.state) == (
        stream_id,
        "api",
        "progress",
        "init_startup",
    )
    assert SECRET not in event_row["payload"].decode()


async def test_init_writes_nothing_when_an_outbox_insert_fails(
    api: httpx.AsyncClient, db_pool: asyncpg.Pool
) -> None:
    marker = f"fail-outbox-{uuid.uuid4().hex[:8]}"
    await db_pool.execute(
        f"""
        CREATE FUNCTION {marker.replace("-", "_")}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF position('{marker}' in convert_from(NEW.payload, 'UTF8')) > 0 THEN
                RAISE EXCEPTION 'outbox insert refused by the test';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER {marker.replace("-", "_")} BEFORE INSERT ON outbox
            FOR EACH ROW EXECUTE FUNCTION {marker.replace("-", "_")}();
        """
    )
    try:
        with pytest.raises(asyncpg.RaiseError):  # the marker rides in the start command's options
            await api.post(
                "/init", json={"url": f"rtsp://camera.test/{marker}", "options": {"classes": [marker]}}
            )
    finally:
        await db_pool.execute(
            f"DROP TRIGGER {marker.replace('-', '_')} ON outbox; DROP FUNCTION {marker.replace('-', '_')}()"
        )
    assert (
        await db_pool.fetchval("SELECT count(*) FROM streams WHERE url_redacted LIKE $1", f"%{marker}") == 0
    )


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://camera.test/live", "scheme must be rtsp or rtsps"),
        (f"https://admin:{SECRET}@camera.test/live", "scheme must be rtsp or rtsps"),
        (f"admin:{SECRET}@camera.test/live", "scheme must be rtsp or rtsps"),
        ("camera.test/live", "scheme must be rtsp or rtsps (none given)"),
        ("rtsp:///live", "no host"),
        (f"rtsp://admin:{SECRET}@/live", "no host"),
        ("rtsp://camera.test:99999/live", "malformed"),
        ("rtsp://camera.test/li ve", "whitespace or control characters"),
        ("rtsp://camera.test/live\n", "whitespace or control characters"),
    ],
)
async def test_init_refuses_a_url_that_is_not_rtsp_with_a_host(
    api: httpx.AsyncClient, url: str, reason: str
) -> None:
    response = await api.post("/init", json={"url": url})

    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "url"]
    assert reason in error["msg"]
    assert SECRET not in response.text and "input" not in error


async def test_init_takes_a_registered_model_and_refuses_one_that_is_not_with_the_names_it_knows(
    settings: Settings, tmp_path: Path
) -> None:
    own = settings.model_copy(update={"ml_weights": {"forklifts": tmp_path / "forklifts.pt"}})
    async with running_api(own) as api:
        refused = await api.post("/init", json={"url": "rtsp://camera.test/a", "options": {"model": "cats"}})
        assert refused.status_code == 422
        (error,) = refused.json()["detail"]
        assert error["loc"] == ["body", "options", "model"]
        assert "'cats' is not registered" in error["msg"] and "default, forklifts" in error["msg"]
        odd = await api.post("/init", json={"url": "rtsp://camera.test/a", "options": {"model": "../x.pt"}})
        assert odd.status_code == 422
        for model in ("forklifts", "default"):
            accepted = await api.post(
                "/init", json={"url": "rtsp://camera.test/a", "options": {"model": model}}
            )
            assert accepted.status_code == 202, accepted.text
            assert accepted.json()["options"]["model"] == model


async def test_init_refuses_a_url_over_the_length_limit(api: httpx.AsyncClient, settings: Settings) -> None:
    url = "rtsp://camera.test/" + "a" * settings.max_url_length

    response = await api.post("/init", json={"url": url})

    assert response.status_code == 422
    assert f"the limit is {settings.max_url_length}" in response.json()["detail"][0]["msg"]
    assert "aaaa" not in response.text


async def test_init_accepts_rtsps_and_a_url_at_the_length_limit(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    url = "rtsps://camera.test/"
    url += "a" * (settings.max_url_length - len(url))

    response = await api.post("/init", json={"url": url})

    assert response.status_code == 202, response.text


@pytest.mark.parametrize(
    ("content", "loc_start"),
    [
        (b'{"url": "rtsp://camera.test/live"', ["body"]),  # truncated JSON
        (b"not json at all", ["body"]),
        (b"{}", ["body", "url"]),
        (json.dumps({"url": 42}).encode(), ["body", "url"]),
        (
            json.dumps({"url": "rtsp://camera.test/x", "options": {"fps": 0}}).encode(),
            ["body", "options", "fps"],
        ),
        (
            json.dumps({"url": "rtsp://camera.test/x", "options": {"confidence": 2}}).encode(),
            ["body", "options"],
        ),
        (json.dumps({"url": "rtsp://camera.test/x", "fps": 5}).encode(), ["body", "fps"]),
    ],
)
async def test_init_refuses_a_body_that_is_not_a_valid_request(
    api: httpx.AsyncClient, content: bytes, loc_start: list[str]
) -> None:
    response = await api.post("/init", content=content, headers={"content-type": "application/json"})

    assert response.status_code == 422
    locs = [error["loc"] for error in response.json()["detail"]]
    assert any(loc[: len(loc_start)] == loc_start for loc in locs), locs


async def test_validation_errors_never_echo_the_request_body(api: httpx.AsyncClient) -> None:
    body = {"URL": f"rtsp://admin:{SECRET}@camera.test/live", "options": {"secret": SECRET}}

    response = await api.post("/init", json=body)

    assert response.status_code == 422
    assert SECRET not in response.text


async def test_init_with_the_same_idempotency_key_returns_the_same_stream_once(
    api: httpx.AsyncClient, db_pool: asyncpg.Pool
) -> None:
    key = f"key-{uuid.uuid4()}"
    request = {"url": camera_url(), "options": {"confidence": 0.5}}

    first = await api.post("/init", json=request, headers={"Idempotency-Key": key})
    again = await asyncio.gather(
        *(api.post("/init", json=request, headers={"Idempotency-Key": key}) for _ in range(4))
    )

    assert first.status_code == 202 and "Idempotent-Replayed" not in first.headers
    assert {r.status_code for r in again} == {202}
    assert {r.json()["id"] for r in again} == {first.json()["id"]}
    assert all(r.headers["Idempotent-Replayed"] == "true" for r in again)
    assert await db_pool.fetchval("SELECT count(*) FROM streams WHERE idempotency_key = $1", key) == 1
    assert len(await outbox_rows(db_pool, first.json()["id"])) == 2


async def test_init_with_a_reused_idempotency_key_and_another_request_is_a_conflict(
    api: httpx.AsyncClient,
) -> None:
    key = f"key-{uuid.uuid4()}"
    assert (
        await api.post("/init", json={"url": camera_url()}, headers={"Idempotency-Key": key})
    ).status_code == 202

    response = await api.post("/init", json={"url": camera_url()}, headers={"Idempotency-Key": key})

    assert response.status_code == 409


async def test_init_refuses_an_oversize_idempotency_key(api: httpx.AsyncClient) -> None:
    response = await api.post("/init", json={"url": camera_url()}, headers={"Idempotency-Key": "k" * 201})

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["header", "idempotency-key"]


async def test_state_shows_the_stream_without_credentials(api: httpx.AsyncClient) -> None:
    created = (await api.post("/init", json={"url": camera_url(credentials=True)})).json()

    by_query = await api.get("/state", params={"id": created["id"]})
    by_path = await api.get(f"/state/{created['id']}")

    assert by_query.status_code == by_path.status_code == 200
    assert by_query.json() == by_path.json()
    view = by_query.json()
    assert view["state"] == "init_startup" and view["error_reason"] is None
    assert view["url_redacted"].startswith("rtsp://***@camera.test:8554/")
    assert view["created_at"] and view["updated_at"]
    assert SECRET not in by_query.text and "url_full" not in view


async def test_state_of_an_unknown_id_is_404(api: httpx.AsyncClient) -> None:
    unknown = uuid.uuid4()

    assert (await api.get(f"/state/{unknown}")).status_code == 404
    response = await api.get("/state", params={"id": str(unknown)})
    assert response.status_code == 404
    assert str(unknown) in response.json()["detail"]


@pytest.mark.parametrize("path", ["/state/not-a-uuid", "/state?id=not-a-uuid", "/state?id=", "/state"])
async def test_state_of_a_malformed_id_is_422_with_a_reason(api: httpx.AsyncClient, path: str) -> None:
    response = await api.get(path)

    assert response.status_code == 422
    assert response.json()["detail"][0]["msg"]


async def test_shutdown_moves_the_stream_to_init_shutdown_with_its_event_and_sends_no_stop_itself(
    api: httpx.AsyncClient, db_pool: asyncpg.Pool, settings: Settings
) -> None:
    stream_id = (await api.post("/init", json={"url": camera_url()})).json()["id"]

    response = await api.post("/shutdown", json={"id": stream_id})

    assert response.status_code == 202
    assert response.json()["state"] == "init_shutdown"
    assert response.json()["version"] == 2
    rows = await outbox_rows(db_pool, stream_id)
    # /init's start command and event, then /shutdown's event: the lifecycle sends the stop
    assert [r["topic"] for r in rows] == [
        settings.topic_commands,
        settings.topic_states,
        settings.topic_states,
    ]
    event = StateEvent.model_validate_json(rows[2]["payload"])
    assert (event.service, event.state) == ("api", StreamState.INIT_SHUTDOWN)
    audit = await db_pool.fetch(
        "SELECT from_state, to_state, version FROM stream_events WHERE stream_id = $1 ORDER BY version",
        uuid.UUID(stream_id),
    )
    assert [tuple(r) for r in audit] == [(None, "init_startup", 1), ("init_startup", "init_shutdown", 2)]


async def test_shutdown_accepts_the_id_as_a_query_parameter(api: httpx.AsyncClient) -> None:
    stream_id = (await api.post("/init", json={"url": camera_url()})).json()["id"]

    response = await api.post("/shutdown", params={"id": stream_id})

    assert response.status_code == 202 and response.json()["state"] == "init_shutdown"


@pytest.mark.parametrize("state", ["inactive", "inactive_error"])
async def test_shutdown_of_a_stream_already_stopped_sends_nothing_and_keeps_its_state(
    api: httpx.AsyncClient, db_pool: asyncpg.Pool, state: str
) -> None:
    stream_id = (await api.post("/init", json={"url": camera_url()})).json()["id"]
    await db_pool.execute(
        "UPDATE streams SET state = $2, version = 5 WHERE id = $1", uuid.UUID(stream_id), state
    )

    response = await api.post("/shutdown", json={"id": stream_id})

    assert response.status_code == 200
    assert response.json()["state"] == state and response.json()["version"] == 5
    assert len(await outbox_rows(db_pool, stream_id)) == 2  # only those of /init


@pytest.mark.parametrize("state", ["init_shutdown", "in_shutdown_processing"])
async def test_shutdown_of_a_stream_still_stopping_sends_its_shutdown_request_again_and_keeps_its_state(
    api: httpx.AsyncClient, db_pool: asyncpg.Pool, state: str
) -> None:
    stream_id = (await api.post("/init", json={"url": camera_url()})).json()["id"]
    await db_pool.execute(
        "UPDATE streams SET state = $2, version = 5 WHERE id = $1", uuid.UUID(stream_id), state
    )

    first = await api.post("/shutdown", json={"id": stream_id})
    second = await api.post("/shutdown", json={"id": stream_id})

    assert first.status_code == second.status_code == 202
    assert second.json()["state"] == state and second.json()["version"] == 5
    rows = await outbox_rows(db_pool, stream_id)
    repeats = [StateEvent.model_validate_json(r["payload"]) for r in rows[2:]]
    assert [(e.service, e.state) for e in repeats] == [("api", StreamState.INIT_SHUTDOWN)] * 2
    assert len({e.event_id for e in repeats}) == 2, "each repeat is a new event"


async def test_concurrent_shutdowns_move_the_stream_once(
    api: httpx.AsyncClient, db_pool: asyncpg.Pool
) -> None:
    stream_id = (await api.post("/init", json={"url": camera_url()})).json()["id"]

    responses = await asyncio.gather(*(api.post("/shutdown", json={"id": stream_id}) for _ in range(5)))

    assert [r.status_code for r in responses] == [202] * 5
    assert {r.json()["version"] for r in responses} == {2}
    moves = await db_pool.fetchval(
        "SELECT count(*) FROM stream_events WHERE stream_id = $1 AND to_state = 'init_shutdown'",
        uuid.UUID(stream_id),
    )
    assert moves == 1
    payloads = [r["payload"] for r in await outbox_rows(db_pool, stream_id)]
    assert not any(b'"kind":"stop"' in p for p in payloads), "the API sends no stop"


async def test_shutdown_of_an_unknown_id_is_404(api: httpx.AsyncClient) -> None:
    response = await api.post("/shutdown", json={"id": str(uuid.uuid4())})

    assert response.status_code == 404


@pytest.mark.parametrize(
    "request_kwargs",
    [
        {"json": {"id": "not-a-uuid"}},
        {"json": {}},
        {},
        {"params": {"id": "1234"}},
        {"content": b'{"id": ', "headers": {"content-type": "application/json"}},
    ],
)
async def test_shutdown_without_a_valid_id_is_422(
    api: httpx.AsyncClient, request_kwargs: dict[str, object]
) -> None:
    response = await api.post("/shutdown", **request_kwargs)  # type: ignore[arg-type]

    assert response.status_code == 422
    assert response.json()["detail"][0]["msg"]


async def test_streams_lists_the_newest_first_and_filters_by_state(
    api: httpx.AsyncClient, db_pool: asyncpg.Pool
) -> None:
    older = (await api.post("/init", json={"url": camera_url(credentials=True)})).json()["id"]
    newer = (await api.post("/init", json={"url": camera_url()})).json()["id"]
    await api.post("/shutdown", json={"id": older})

    listed = await api.get("/streams", params={"limit": 1000})
    shutting = await api.get("/streams", params={"state": "init_shutdown", "limit": 1000})

    assert listed.status_code == 200 and SECRET not in listed.text
    ids = [s["id"] for s in listed.json()["streams"]]
    assert ids.index(newer) < ids.index(older)
    assert older in {s["id"] for s in shutting.json()["streams"]}
    assert {s["state"] for s in shutting.json()["streams"]} == {"init_shutdown"}
    assert (await api.get("/streams", params={"limit": 1})).json()["streams"][0]["id"] != older
    assert (await api.get("/streams", params={"state": "running"})).status_code == 422
    assert (await api.get("/streams", params={"limit": 0})).status_code == 422


@pytest.mark.parametrize("temporal", ["stopped", "not answering"])
async def test_state_answers_from_postgres_at_once_with_null_health_and_why_when_temporal_does_not(
    settings: Settings, temporal: str
) -> None:
    if temporal == "stopped":
        address = f"127.0.0.1:{free_port()}"  # nothing listens
    else:
        silent = socket.socket()  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
    async with running_api(settings.model_copy(update={"temporal_address": address})) as api:
        stream_id = (await api.post("/init", json={"url": camera_url()})).json()["id"]
        started = time.monotonic()
        response = await api.get(f"/state/{stream_id}")
        took = time.monotonic() - started
        listed = await api.get("/streams", params={"limit": 5})

    assert response.status_code == 200
    body = response.json()
    assert body["state"] == "init_startup" and body["health"] is None
    assert body["health_unavailable"], body
    assert took < 1.0, f"/state took {took:.2f}s without Temporal"
    assert listed.status_code == 200
    assert all(s["health"] is None and s["health_unavailable"] for s in listed.json()["streams"])
    if temporal != "stopped":
        silent.close()


async def test_streams_page_by_cursor_running_first_and_filter_by_state_running_and_text(
    private_database: str,
) -> None:
    settings = make_settings(database_url=private_database)
    ids = await add_streams(settings, count=120, running=7)
    async with running_api(settings) as api:
        seen: list[dict[str, object]] = []
        cursor = None
        while True:
            params: dict[str, object] = {"limit": 50, **({"cursor": cursor} if cursor else {})}
            page = (await api.get("/streams", params=params)).json()
            seen += page["streams"]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert [s["id"] for s in seen] == ids[-7:][::-1] + ids[:-7][::-1], "running first, then newest first"
        assert len({s["id"] for s in seen}) == 120

        ended = (await api.get("/streams", params={"running": "false", "limit": 1000})).json()["streams"]
        assert len(ended) == 113 and all(s["state"].startswith("inactive") for s in ended)
        running = (await api.get("/streams", params={"running": "true"})).json()
        assert [s["id"] for s in running["streams"]] == ids[-7:][::-1] and running["next_cursor"] is None
        failed = (await api.get("/streams", params={"state": "inactive_error", "limit": 1000})).json()
        assert {s["state"] for s in failed["streams"]} == {"inactive_error"}
        found = (await api.get("/streams", params={"q": "SITE-042"})).json()["streams"]
        assert [s["url_redacted"] for s in found] == ["rtsp://camera.local/site-042/live"]
        by_id = (await api.get("/streams", params={"q": ids[3][:13]})).json()["streams"]
        assert [s["id"] for s in by_id] == [ids[3]]
        assert (await api.get("/streams", params={"q": "%_"})).json()["streams"] == [], (
            "LIKE wildcards are text"
        )
        for bad in ("nope", "W10", "bm90IGpzb24"):
            response = await api.get("/streams", params={"cursor": bad})
            assert response.status_code == 422 and "next_cursor" in response.text, bad

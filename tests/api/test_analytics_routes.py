"""PATCH /streams/{id}, GET /events and the analytics of /state on the real Postgres (no pipeline)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest

from core.api_keys import Scope
from core.health_events import HealthEvent, HealthKind, health_event_id, store_health_event
from core.messages import StartCommand, parse_command
from core.settings import Settings
from tests.running_services import new_api_key, running_api

DOOR = {"name": "door", "points": [[0.5, 0.0], [0.5, 1.0]]}
BAY = {"name": "bay", "points": [[0.6, 0.0], [1.0, 0.0], [1.0, 1.0]], "dwell_s": 5}


async def start(api: httpx.AsyncClient, **options: object) -> dict[str, object]:
    response = await api.post("/init", json={"url": "rtsp://camera.test/analytics", "options": options})
    assert response.status_code == 202, response.text
    body: dict[str, object] = response.json()
    return body


async def test_init_with_a_webhook_shows_its_secret_once_and_stores_it_sealed(
    api: httpx.AsyncClient, db_pool: asyncpg.Pool
) -> None:
    stream = await start(api, lines=[DOOR], webhook_url="https://hooks.example.com/lookout")
    secret = stream["webhook_secret"]
    assert isinstance(secret, str) and secret.startswith("whsec_")
    assert (await api.get(f"/state/{stream['id']}")).json()["webhook_secret"] is None
    stored = await db_pool.fetchval(
        "SELECT webhook_secret FROM streams WHERE id = $1", uuid.UUID(str(stream["id"]))
    )
    assert stored and secret not in stored
    # analytics: every line of the options, at zero until the detection process writes them
    assert (await api.get(f"/state/{stream['id']}")).json()["analytics"] == {
        "zones": [],
        "lines": [{"name": "door", "in": 0, "out": 0}],
    }


async def test_patch_stores_the_options_and_sends_them_to_ml_only(
    api: httpx.AsyncClient, db_pool: asyncpg.Pool, settings: Settings
) -> None:
    stream = await start(api, fps=5, lines=[DOOR])
    response = await api.patch(
        f"/streams/{stream['id']}", json={"options": {"zones": [BAY], "confidence": 0.4}}
    )
    assert response.status_code == 200, response.text
    options = response.json()["options"]
    assert options["fps"] == 5 and options["confidence"] == 0.4
    assert [z["name"] for z in options["zones"]] == ["bay"] and [ln["name"] for ln in options["lines"]] == [
        "door"
    ]
    assert response.json()["analytics"]["zones"] == [{"name": "bay", "occupancy": 0, "entered": 0, "left": 0}]
    payloads = await db_pool.fetch(
        "SELECT payload FROM outbox WHERE topic = $1 AND key = $2 ORDER BY id",
        settings.topic_commands,
        stream["id"],
    )
    commands = [parse_command(bytes(p["payload"])) for p in payloads]
    assert len(commands) == 2  # the start of /init, then the options for ML
    patch = commands[-1]
    assert isinstance(patch, StartCommand) and patch.service == "ml" and not patch.replace
    assert patch.options.zones and patch.options.zones[0].name == "bay"
    audit = await db_pool.fetchval(
        "SELECT reason FROM stream_events WHERE stream_id = $1 AND kind = 'options'",
        uuid.UUID(str(stream["id"])),
    )
    assert audit == "PATCH /streams"
    # null clears a field
    cleared = await api.patch(f"/streams/{stream['id']}", json={"options": {"lines": None}})
    assert cleared.status_code == 200 and cleared.json()["options"].get("lines") is None


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"zones": [{"name": "z", "points": [[0, 0], [1, 1], [1, 0], [0, 1]]}]}, "self-intersecting polygon"),
        ({"lines": [{"name": "l", "points": [[0, 0], [1.2, 1]]}]}, "outside the image"),
        (
            {"zones": [{"name": "z", "points": [[0, 0], [1, 0], [1, 1]], "classes": ["unicorn"]}]},
            "unknown class",
        ),
        ({"zones": [{"name": "door", "points": [[0, 0], [1, 0], [1, 1]]}]}, "must be unique"),
        ({"webhook_url": "https://user:secret@hooks.example.com/"}, "must not hold credentials"),
        ({"fps": 3}, "Extra inputs are not permitted"),
    ],
)
async def test_patch_refuses_bad_zones_and_lines_with_a_reason(
    api: httpx.AsyncClient, options: dict[str, object], reason: str
) -> None:
    stream = await start(api, lines=[DOOR])
    response = await api.patch(f"/streams/{stream['id']}", json={"options": options})
    assert response.status_code == 422, response.text
    assert reason in response.text
    assert "secret@" not in response.text


async def test_init_refuses_a_self_intersecting_zone_with_a_reason(api: httpx.AsyncClient) -> None:
    zone = {"name": "z", "points": [[0, 0], [1, 1], [1, 0], [0, 1]]}
    response = await api.post("/init", json={"url": "rtsp://camera.test/x", "options": {"zones": [zone]}})
    assert response.status_code == 422 and "self-intersecting polygon" in response.text


async def test_patch_of_an_unknown_or_ended_stream(api: httpx.AsyncClient, db_pool: asyncpg.Pool) -> None:
    assert (await api.patch(f"/streams/{uuid.uuid4()}", json={"options": {"track": True}})).status_code == 404
    stream = await start(api)
    await db_pool.execute("UPDATE streams SET state = 'inactive' WHERE id = $1", uuid.UUID(str(stream["id"])))
    response = await api.patch(f"/streams/{stream['id']}", json={"options": {"track": True}})
    assert response.status_code == 409 and "inactive" in response.text


async def test_events_filters_and_pages_newest_first(api: httpx.AsyncClient, db_pool: asyncpg.Pool) -> None:
    stream = await start(api, lines=[DOOR])
    sid = uuid.UUID(str(stream["id"]))
    for seq, (kind, zone, direction) in enumerate(
        [
            ("crossed", "door", "in"),
            ("crossed", "door", "out"),
            ("entered", "bay", None),
            ("crossed", "door", "in"),
        ]
    ):
        await db_pool.execute(
            """
            INSERT INTO events (event_id, stream_id, frame_seq, kind, zone, direction, track_id, class_name,
                                confidence, occurred_at, s3_key)
            VALUES ($1, $2, $3, $4, $5, $6, 1, 'person', 0.9, now(), 'streams/x/frames/1.jpg')
            """,
            f"{sid}:{seq}",
            sid,
            seq,
            kind,
            zone,
            direction,
        )
    page = (await api.get("/events", params={"id": str(sid), "zone": "door", "limit": 2})).json()
    assert [(e["kind"], e["direction"]) for e in page["items"]] == [("crossed", "in"), ("crossed", "out")]
    assert page["items"][0]["id"] > page["items"][1]["id"] and page["next_cursor"]
    rest = (
        await api.get("/events", params={"id": str(sid), "zone": "door", "cursor": page["next_cursor"]})
    ).json()
    assert [(e["kind"], e["direction"]) for e in rest["items"]] == [("crossed", "in")] and rest[
        "next_cursor"
    ] is None
    entered = (await api.get("/events", params={"id": str(sid), "kind": "entered"})).json()["items"]
    assert [e["zone"] for e in entered] == ["bay"]
    assert (await api.get("/events", params={"kind": "teleported"})).status_code == 422
    assert (await api.get("/events", params={"cursor": "99999999999999999999"})).status_code == 422
    feed = await api.get("/events/stream", headers={"Last-Event-ID": "-1"})
    assert feed.status_code == 422 and "last-event-id" in feed.text


async def test_a_health_event_is_stored_once_with_its_outbox_message_and_deliveries_and_listed(
    api: httpx.AsyncClient, db_pool: asyncpg.Pool, settings: Settings
) -> None:
    stream = await start(api, webhook_url="https://hooks.example.com/lookout")
    sid = str(stream["id"])
    down = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
    back = down + timedelta(seconds=42)
    online = HealthEvent(
        event_id=health_event_id(sid, HealthKind.CAMERA_ONLINE, down), stream_id=sid,
        kind=HealthKind.CAMERA_ONLINE, occurred_at=back, since=down, downtime_s=42.0,
    )  # fmt: skip
    with_mqtt = settings.model_copy(update={"mqtt_enabled": True})
    assert await store_health_event(db_pool, with_mqtt, online)
    assert not await store_health_event(db_pool, with_mqtt, online), "a retried activity stores it twice"
    pk = await db_pool.fetchval("SELECT id FROM events WHERE event_id = $1", online.event_id)
    outbox = await db_pool.fetch(
        "SELECT topic, payload FROM outbox WHERE dedupe_key = $1", f"health:{online.event_id}"
    )
    assert [r["topic"] for r in outbox] == [settings.topic_events]
    assert HealthEvent.model_validate_json(outbox[0]["payload"]) == online
    assert await db_pool.fetchval("SELECT count(*) FROM webhook_deliveries WHERE event_pk = $1", pk) == 1
    assert await db_pool.fetchval("SELECT count(*) FROM mqtt_deliveries WHERE event_pk = $1", pk) == 1

    [view] = (await api.get("/events", params={"id": sid, "kind": "camera_online"})).json()["items"]
    assert view["kind"] == "camera_online" and view["downtime_s"] == 42.0 and view["image_url"] is None
    assert view["zone"] is None and view["since"].startswith("2026-12-06T12:00:00")
    missing = HealthEvent(
        event_id="x", stream_id=str(uuid.uuid4()), kind=HealthKind.STREAM_FAILED, occurred_at=back, final=True
    )
    assert not await store_health_event(db_pool, settings, missing), "an event of no stream"


async def test_reading_events_needs_a_key_and_patching_an_admin_key(settings: Settings) -> None:
    async with running_api(settings, scope=None) as anonymous:
        assert (await anonymous.get("/events")).status_code == 401
        assert (await anonymous.get("/events/stream")).status_code == 401
    async with running_api(settings, scope=None) as client:
        token = await new_api_key(settings, Scope.READ)
        headers = {"Authorization": f"Bearer {token}"}
        assert (await client.get("/events", headers=headers)).status_code == 200
        response = await client.patch(f"/streams/{uuid.uuid4()}", json={"options": {}}, headers=headers)
        assert response.status_code == 403

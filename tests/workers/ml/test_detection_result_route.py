"""GET /detection_result on the real Postgres and S3 gateway: paging, fresh links, 404."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from urllib.parse import parse_qs, urlsplit

import asyncpg
import httpx
import pytest

from core.detections import Box, DetectedObject
from core.messages import FrameHeaders
from core.settings import Settings
from tests.running_services import running_api
from tests.workers.ml.conftest import insert_stream
from workers.ml.store import DetectionStore

pytestmark = pytest.mark.integration

BUS = DetectedObject(class_name="bus", class_id=5, confidence=0.93, box=Box(x1=10, y1=20, x2=300, y2=200))


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with running_api(settings.model_copy(update={"s3_presign_expiry_s": 120})) as client:
        yield client


@pytest.fixture
async def stream_with_five_frames(settings: Settings, db_pool: asyncpg.Pool) -> str:
    """A stream whose frames 1..5 were stored the way ML stores them (JPEG body: its frame number)."""
    stream_id = await insert_stream(db_pool)
    store = DetectionStore(settings)
    try:
        for seq in range(1, 6):
            headers = FrameHeaders(
                stream_id=stream_id, frame_seq=seq, capture_ts=1_700_000_000 + seq, width=640, height=480
            )
            await asyncio.to_thread(store.save, headers, f"jpeg {seq}".encode(), [BUS])
    finally:
        store.close()
    return stream_id


async def test_pages_run_newest_first_and_each_link_serves_its_frame(
    api: httpx.AsyncClient, stream_with_five_frames: str
) -> None:
    seen: list[int] = []
    cursor = None
    pages = 0
    async with httpx.AsyncClient() as http:
        while True:
            params: dict[str, str | int] = {"id": stream_with_five_frames, "limit": 2}
            if cursor:
                params["cursor"] = cursor
            response = await api.get("/detection_result", params=params)
            assert response.status_code == 200, response.text
            body = response.json()
            pages += 1
            for item in body["items"]:
                seen.append(item["frame_seq"])
                assert item["objects"] == [
                    {
                        "class": "bus",
                        "class_id": 5,
                        "confidence": 0.93,
                        "box": {"x1": 10, "y1": 20, "x2": 300, "y2": 200},
                        "track_id": None,  # tracking was off
                    }
                ]
                assert (item["width"], item["height"]) == (640, 480)
                assert item["capture_time"].startswith("2023-11-14T22:13:2")
                image = await http.get(item["image_url"])
                assert image.status_code == 200
                assert image.content == f"jpeg {item['frame_seq']}".encode()
            cursor = body["next_cursor"]
            if cursor is None:
                break
    assert seen == [5, 4, 3, 2, 1]
    assert pages == 3


async def test_links_are_signed_at_read_time_with_the_configured_expiry(
    api: httpx.AsyncClient, stream_with_five_frames: str, db_pool: asyncpg.Pool
) -> None:
    def signed_at(url: str) -> datetime:
        query = parse_qs(urlsplit(url).query)
        assert query["X-Amz-Expires"] == ["120"]
        return datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)

    first = (await api.get("/detection_result", params={"id": stream_with_five_frames, "limit": 1})).json()
    assert first["links_expire_in_s"] == 120
    url = first["items"][0]["image_url"]
    assert abs((datetime.now(UTC) - signed_at(url)).total_seconds()) < 10, "signed just now"
    await asyncio.sleep(1.1)
    second = (await api.get("/detection_result", params={"id": stream_with_five_frames, "limit": 1})).json()
    assert signed_at(second["items"][0]["image_url"]) > signed_at(url), "a new link for every read"
    stored = await db_pool.fetchval(
        "SELECT s3_key FROM detections WHERE stream_id = $1 AND frame_seq = 5",
        uuid.UUID(stream_with_five_frames),
    )
    assert "X-Amz" not in stored, "only the key is stored, never a link"


async def test_unknown_stream_is_404_and_a_known_stream_without_detections_is_an_empty_page(
    api: httpx.AsyncClient, db_pool: asyncpg.Pool
) -> None:
    missing = await api.get("/detection_result", params={"id": str(uuid.uuid4())})
    assert missing.status_code == 404
    stream_id = await insert_stream(db_pool)
    empty = await api.get("/detection_result", params={"id": stream_id})
    assert empty.status_code == 200
    assert (empty.json()["items"], empty.json()["next_cursor"]) == ([], None)


@pytest.mark.parametrize(
    "params", [{"id": "not-a-uuid"}, {"limit": 0}, {"limit": 10_000}, {"cursor": "abc"}], ids=str
)
async def test_bad_query_is_refused_with_422(api: httpx.AsyncClient, params: dict[str, str | int]) -> None:
    query = {"id": str(uuid.uuid4()), **params}
    assert (await api.get("/detection_result", params=query)).status_code == 422

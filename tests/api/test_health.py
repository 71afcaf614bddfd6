"""Liveness, readiness, OpenAPI docs and metrics."""

from __future__ import annotations

import httpx
import pytest

from core.settings import Settings
from deploy import servers
from tests.running_services import running_api

pytestmark = pytest.mark.integration


async def test_healthz_answers_ok(api: httpx.AsyncClient) -> None:
    response = await api.get("/healthz")

    assert response.status_code == 200 and response.json() == {"status": "ok"}


async def test_readyz_is_ready_when_postgres_kafka_and_temporal_answer(api: httpx.AsyncClient) -> None:
    response = await api.get("/readyz")

    assert response.status_code == 200, response.text
    assert response.json() == {
        "status": "ready",
        "checks": {"postgres": "ok", "kafka": "ok", "temporal": "ok"},
    }


async def test_readyz_is_503_naming_kafka_and_temporal_when_they_are_unreachable(settings: Settings) -> None:
    dead = f"127.0.0.1:{servers.free_port()}"
    unreachable = settings.model_copy(update={"kafka_bootstrap": dead, "temporal_address": dead})
    async with running_api(unreachable) as api:
        response = await api.get("/readyz")

    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["postgres"] == "ok"
    assert checks["kafka"].startswith("error") and checks["temporal"].startswith("error")


async def test_docs_and_openapi_describe_the_endpoints(api: httpx.AsyncClient) -> None:
    docs = await api.get("/docs")
    schema = (await api.get("/openapi.json")).json()

    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert {"/init", "/shutdown", "/state", "/state/{stream_id}", "/streams", "/healthz", "/readyz"} <= set(
        schema["paths"]
    )


async def test_metrics_count_accepted_streams(api: httpx.AsyncClient) -> None:
    await api.post("/init", json={"url": "rtsp://camera.test/metrics"})

    response = await api.get("/metrics/")

    assert response.status_code == 200
    assert "lookout_api_streams_started_total" in response.text

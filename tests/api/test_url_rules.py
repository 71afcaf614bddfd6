"""Which stream URLs /init accepts, and what of them the API shows."""

from __future__ import annotations

import httpx
import pytest

from api.schemas import stream_url_problem
from core.redact import redact_url


@pytest.mark.parametrize(
    "url",
    [
        "rtsp://camera.test/live",
        "RTSP://camera.test/live",
        "rtsps://camera.test:322/live?channel=1",
        "rtsp://admin:pw@10.0.0.5:554/Streaming/Channels/101",
        "rtsp://[::1]:8554/live",
    ],
)
def test_stream_url_rules_accept_rtsp_and_rtsps_with_a_host(url: str) -> None:
    assert stream_url_problem(url, max_length=2048) is None


@pytest.mark.parametrize(
    "url",
    [
        "",
        "rtsp://",
        "rtsp://:554/live",
        "rtsp://camera.test:0/live",
        "rtmp://camera.test/live",
        "file:///etc/passwd",
    ],
)
def test_stream_url_rules_refuse_what_is_not_rtsp_with_a_host(url: str) -> None:
    assert stream_url_problem(url, max_length=2048) is not None


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("rtsp://admin:pw@camera.test:554/live", "rtsp://***@camera.test:554/live"),
        (
            "rtsp://camera.test/live?user=admin&password=pw&channel=2",
            "rtsp://camera.test/live?user=***&password=***&channel=2",
        ),
        ("rtsp://camera.test/live?token=abc", "rtsp://camera.test/live?token=***"),
        ("rtsp://camera.test/live?channel=2", "rtsp://camera.test/live?channel=2"),
    ],
)
def test_redacted_url_hides_userinfo_and_credential_query_parameters(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.integration
async def test_state_never_shows_credentials_given_in_the_query(api: httpx.AsyncClient) -> None:
    created = await api.post("/init", json={"url": "rtsp://camera.test/live?user=admin&pwd=Qx7-query-secret"})
    view = await api.get(f"/state/{created.json()['id']}")

    assert "Qx7-query-secret" not in created.text + view.text
    assert view.json()["url_redacted"] == "rtsp://camera.test/live?user=***&pwd=***"

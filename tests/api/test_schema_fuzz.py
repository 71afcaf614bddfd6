"""The API fuzzed against its own OpenAPI schema (schemathesis), over real HTTP on the real Postgres:
no generated request, valid or not, gets a 5xx, and every response matches what the schema says."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import hypothesis
import pytest
import schemathesis
import uvicorn
from schemathesis import BaseSchema
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api.main import create_app
from core.api_keys import Scope, create_key
from core.db import create_pool
from core.settings import Settings
from tests.conftest import make_settings

pytestmark = pytest.mark.integration

EXAMPLES_PER_OPERATION = 30  # bounded: the whole fuzz takes well under a minute
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def served(settings: Settings) -> Iterator[tuple[str, str]]:
    """The API behind uvicorn in a thread of its own; its base URL and an admin token."""
    token = asyncio.run(_admin_token(settings))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the API did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", token
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


async def _admin_token(settings: Settings) -> str:
    pool = await create_pool(settings)
    try:
        _key, token = await create_key(pool, name="schemathesis", scope=Scope.ADMIN)
        return token
    finally:
        await pool.close()


# The schema as the app publishes it at /openapi.json (making the app connects to nothing).
# The live event feed never ends by design (tests/e2e/test_analytics.py reads it): not fuzzed here.
schema: BaseSchema = schemathesis.openapi.from_dict(create_app(make_settings()).openapi()).exclude(
    path="/events/stream"
)


@schema.parametrize()
@hypothesis.settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
    derandomize=True,
)
def test_no_request_gets_a_5xx_and_every_response_matches_the_schema(case, served) -> None:  # type: ignore[no-untyped-def]
    base_url, token = served
    case.call_and_validate(base_url=base_url, headers={"Authorization": f"Bearer {token}"}, checks=CHECKS)

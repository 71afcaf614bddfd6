from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from core.settings import Settings
from tests.running_services import running_api


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The API in-process on the session's servers."""
    async with running_api(settings) as client:
        yield client

"""One lifecycle stack per module: API, outbox relay, state bridge, Temporal worker and the scripted
runner and ML, all in-process on the session's servers with topics and a task queue of their own."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from core.settings import Settings
from tests.participants import Participants, running_participants
from tests.running_services import LifecycleStack, isolated_settings, running_lifecycle

# Short acknowledgement deadline: a silent service turns into inactive_error within seconds.
ACK_DEADLINE_S = 2.0
STARTUP_DEADLINE_S = 30.0


@pytest.fixture(scope="module")
async def lifecycle_settings(settings: Settings) -> Settings:
    return await isolated_settings(
        settings, ack_deadline_s=ACK_DEADLINE_S, startup_deadline_s=STARTUP_DEADLINE_S
    )


@pytest.fixture(scope="module")
async def participants(lifecycle_settings: Settings) -> AsyncIterator[Participants]:
    async with running_participants(lifecycle_settings) as running:
        yield running


@pytest.fixture(scope="module")
async def stack(lifecycle_settings: Settings, participants: Participants) -> AsyncIterator[LifecycleStack]:
    async with running_lifecycle(lifecycle_settings) as running:
        yield running

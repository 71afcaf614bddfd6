"""The Temporal environment of the workflow tests: time-skipping (default), local, or a running server.

As in temporalio/samples-python, ``--workflow-environment`` chooses: ``time-skipping`` (the SDK's
test server, timers skip ahead), ``local`` (a dev server started for the session) or the
``host:port`` of an existing server. Tests that rely on timers passing quickly ask for
``time_skipping`` and are skipped on the other two.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from core.temporal import DATA_CONVERTER, SEARCH_ATTRIBUTES
from deploy.servers import venv_bin

_INDEXED = {"Keyword": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD}


@pytest.fixture(scope="session")
async def env(request: pytest.FixtureRequest) -> AsyncIterator[WorkflowEnvironment]:
    """The session's Temporal environment (local binaries: the SDK's downloads need the internet)."""
    kind = request.config.getoption("--workflow-environment")
    if kind == "time-skipping":
        environment = await WorkflowEnvironment.start_time_skipping(
            data_converter=DATA_CONVERTER, test_server_existing_path=venv_bin("temporal-test-server")
        )
        # Unlike the dev server (--search-attribute flags), the test server needs them registered.
        await environment.client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(
                namespace=environment.client.namespace,
                search_attributes={name: _INDEXED[k] for name, k in SEARCH_ATTRIBUTES.items()},
            )
        )
    elif kind == "local":
        environment = await WorkflowEnvironment.start_local(
            data_converter=DATA_CONVERTER,
            dev_server_existing_path=venv_bin("temporal"),
            dev_server_extra_args=[
                arg for name, k in SEARCH_ATTRIBUTES.items() for arg in ("--search-attribute", f"{name}={k}")
            ],
        )
    else:
        environment = WorkflowEnvironment.from_client(
            await Client.connect(kind, data_converter=DATA_CONVERTER)
        )
    try:
        yield environment
    finally:
        await environment.shutdown()


@pytest.fixture
def time_skipping(env: WorkflowEnvironment) -> WorkflowEnvironment:
    """``env``, for a test whose timers must pass at once; skipped where time cannot skip."""
    if not env.supports_time_skipping:
        pytest.skip("needs --workflow-environment time-skipping: its timers would take real minutes")
    return env

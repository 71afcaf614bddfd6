"""A stream's live health, asked of its lifecycle workflow, never waited for long.

``GET /state`` answers from Postgres; the health comes from the workflow's ``health`` query when
Temporal answers within ``api_health_timeout_s``, and is null with the reason otherwise, so a slow or
stopped Temporal never slows the API down.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from temporalio.client import WorkflowQueryFailedError, WorkflowQueryRejectedError
from temporalio.service import RPCError, RPCStatusCode

from api.readiness import TemporalConnection
from core.health import HEALTH_QUERY, StreamHealth
from core.settings import Settings
from core.streams import StreamRow
from core.temporal import workflow_id

log = logging.getLogger(__name__)

Health = tuple[StreamHealth | None, str | None]  # the health, or None with why


async def stream_health(temporal: TemporalConnection, settings: Settings, stream: StreamRow) -> Health:
    """The health of one stream's lifecycle, or None and the reason."""
    if stream.state.is_terminal:
        return None, "the stream has ended"
    timeout_s = settings.api_health_timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            client = await temporal.client()
            handle = client.get_workflow_handle(workflow_id(str(stream.id)))
            health = await handle.query(
                HEALTH_QUERY, result_type=StreamHealth, rpc_timeout=timedelta(seconds=timeout_s)
            )
    except TimeoutError:
        return None, f"the lifecycle did not answer within {timeout_s:g}s"
    except RPCError as err:
        if err.status is RPCStatusCode.NOT_FOUND:
            return None, "no lifecycle has started for the stream yet"
        log.info("health not available", extra={"stream_id": str(stream.id), "error": repr(err)})
        return None, f"the lifecycle is not reachable ({err.status.name})"
    # the SDK's connect raises a RuntimeError for a server that refuses the connection
    except (WorkflowQueryFailedError, WorkflowQueryRejectedError, OSError, RuntimeError) as err:
        log.info("health not available", extra={"stream_id": str(stream.id), "error": repr(err)})
        return None, f"the lifecycle is not reachable ({type(err).__name__})"
    return health, None


async def streams_health(
    temporal: TemporalConnection, settings: Settings, streams: list[StreamRow]
) -> list[Health]:
    """The health of several streams, asked all at once (so the whole takes one timeout at most)."""
    return list(await asyncio.gather(*(stream_health(temporal, settings, s) for s in streams)))

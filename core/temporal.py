"""Temporal client factory and the lifecycle's search attributes."""

from __future__ import annotations

from temporalio.client import Client
from temporalio.common import SearchAttributeKey

from core.settings import Settings

STREAM_ID = SearchAttributeKey.for_keyword("StreamId")
STREAM_STATE = SearchAttributeKey.for_keyword("StreamState")
SEARCH_ATTRIBUTES = {STREAM_ID.name: "Keyword", STREAM_STATE.name: "Keyword"}


def workflow_id(stream_id: str) -> str:
    """The lifecycle workflow id of a stream."""
    return f"stream-{stream_id}"


async def connect_temporal(settings: Settings) -> Client:
    return await Client.connect(settings.temporal_address, namespace=settings.temporal_namespace)

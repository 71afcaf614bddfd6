"""Temporal client factory and the lifecycle's search attributes."""

from __future__ import annotations

from temporalio.client import Client
from temporalio.common import SearchAttributeKey
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter

from core.settings import Settings

STREAM_ID = SearchAttributeKey.for_keyword("StreamId")
STREAM_STATE = SearchAttributeKey.for_keyword("StreamState")
SEARCH_ATTRIBUTES = {STREAM_ID.name: "Keyword", STREAM_STATE.name: "Keyword"}

# Workflow payloads are the pydantic models of core/ (StateEvent, StopCommand, ...): every client,
# worker and replayer must use this converter, or pydantic payloads fail to (de)serialize.
DATA_CONVERTER: DataConverter = pydantic_data_converter


def workflow_id(stream_id: str) -> str:
    """The lifecycle workflow id of a stream."""
    return f"stream-{stream_id}"


async def connect_temporal(settings: Settings) -> Client:
    """A client for Lookout's namespace that (de)serializes the pydantic payloads of core/."""
    return await Client.connect(
        settings.temporal_address, namespace=settings.temporal_namespace, data_converter=DATA_CONVERTER
    )

"""A running stream's live annotated view: POST /streams/{id}/live for a ticket, then
GET /streams/{id}/live.mjpeg?ticket=… (an ``<img>`` can show it). See api/live.py."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator
from contextlib import suppress
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.types import Message, Receive, Scope, Send

from api.auth import AUTH_RESPONSES, ReadKey
from api.deps import DbDep, SettingsDep
from api.live import LiveHub, LiveTickets, TicketRefused, TooManyViewers
from core.api_keys import key_active
from core.metrics import LIVE_VIEWERS_STALLED
from core.streams import get_stream
from core.timeouts import within

log = logging.getLogger(__name__)

router = APIRouter(tags=["live"])

BOUNDARY = "lookout-frame"
CHECK_EVERY_S = 5.0  # an open view checks this often that its stream runs and its key is not revoked

NOT_RUNNING: dict[int | str, dict[str, Any]] = {
    404: {"description": "No stream has this id"},
    409: {"description": "The stream is shutting down or has ended"},
}


def get_live(request: Request) -> LiveHub:
    hub: LiveHub = request.app.state.live
    return hub


def get_tickets(request: Request) -> LiveTickets:
    tickets: LiveTickets | None = request.app.state.live_tickets
    if tickets is None:  # no LOOKOUT_SECRET_KEY (or its file unreadable)
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail="live views need LOOKOUT_SECRET_KEY (it signs their tickets)",
        )
    return tickets


LiveDep = Annotated[LiveHub, Depends(get_live)]
TicketsDep = Annotated[LiveTickets, Depends(get_tickets)]


class LiveTicket(BaseModel):
    """Where the stream's live view is, for ``expires_in_s`` (an open view stays open past it)."""

    url: str
    expires_at: float  # seconds since the epoch
    expires_in_s: float


async def _running_or_error(db: DbDep, stream_id: uuid.UUID) -> None:
    stream = await get_stream(db, stream_id)
    if stream is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"stream {stream_id} not found")
    if stream.state.is_shutting_down:
        raise HTTPException(
            status.HTTP_409_CONFLICT, detail=f"stream {stream_id} is {stream.state.value}: nothing to watch"
        )


@router.post("/streams/{stream_id}/live", responses=AUTH_RESPONSES | NOT_RUNNING)
async def live_ticket(
    stream_id: uuid.UUID, db: DbDep, settings: SettingsDep, tickets: TicketsDep, key: ReadKey
) -> LiveTicket:
    """A ticket to the stream's live view: its annotated frames (boxes, track ids, zones, lines) as
    MJPEG, made only while someone watches. Any valid key may watch; the view ends when that key is
    revoked."""
    await _running_or_error(db, stream_id)
    ticket, expires_at = tickets.issue(str(stream_id), key.id)
    return LiveTicket(
        url=f"/streams/{stream_id}/live.mjpeg?ticket={ticket}",
        expires_at=expires_at,
        expires_in_s=settings.live_ticket_ttl_s,
    )


class LiveResponse(StreamingResponse):
    """MJPEG parts as the viewer takes them. A part the viewer's socket does not take within
    ``stall_s`` ends the view (it was dropping frames all along); however the response ends, its
    generator is closed, so the viewer leaves the hub at once and no watch is sent for it."""

    def __init__(self, parts: AsyncGenerator[bytes, None], stall_s: float) -> None:
        super().__init__(
            parts,
            media_type=f"multipart/x-mixed-replace; boundary={BOUNDARY}",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )
        self._parts = parts
        self._stall_s = stall_s

    async def stream_response(self, send: Send) -> None:
        async def bounded(message: Message) -> None:
            await within(send(message), self._stall_s)

        try:
            await super().stream_response(bounded)
        except TimeoutError:
            LIVE_VIEWERS_STALLED.inc()
            log.info("live viewer stalled: view ended", extra={"stall_s": self._stall_s})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._parts.aclose()


@router.get(
    "/streams/{stream_id}/live.mjpeg",
    response_class=StreamingResponse,
    responses={
        200: {"content": {f"multipart/x-mixed-replace; boundary={BOUNDARY}": {}}, "description": "MJPEG"},
        401: {"description": "Malformed, altered or expired ticket, or its key was revoked"},
        422: {"description": "No ticket"},
        503: {"description": "This API instance serves its most live views already"},
        **NOT_RUNNING,
    },
)
async def live_view(
    stream_id: uuid.UUID,
    db: DbDep,
    hub: LiveDep,
    tickets: TicketsDep,
    ticket: Annotated[str, Query(max_length=200, description="from POST /streams/{id}/live")],
) -> StreamingResponse:
    """The stream's annotated frames as they are made (``multipart/x-mixed-replace``), until the
    stream ends, its key is revoked or the viewer leaves. A viewer that does not keep up gets the
    newest frames; one that takes nothing for ``LOOKOUT_LIVE_STALL_S`` is disconnected."""
    try:
        key_id = tickets.check(str(stream_id), ticket)
    except TicketRefused as err:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, detail=str(err)) from None
    if not await key_active(db, key_id):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, detail="the key this ticket was issued to is revoked"
        )
    await _running_or_error(db, stream_id)
    if hub.full:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, detail="too many live views on this instance"
        )

    async def still_allowed() -> bool:
        stream = await get_stream(db, stream_id)
        return stream is not None and not stream.state.is_shutting_down and await key_active(db, key_id)

    async def parts() -> AsyncGenerator[bytes, None]:
        try:
            async with hub.watching(str(stream_id)) as viewer:
                next_check = time.monotonic() + CHECK_EVERY_S
                while True:
                    with suppress(TimeoutError):
                        jpeg = await within(viewer.frames.get(), CHECK_EVERY_S)
                        yield (
                            (
                                f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n"
                            ).encode()
                            + jpeg
                            + b"\r\n"
                        )
                    if time.monotonic() >= next_check:
                        if not await still_allowed():
                            return
                        next_check = time.monotonic() + CHECK_EVERY_S
        except TooManyViewers:  # filled up between the check and now
            return

    return LiveResponse(parts(), hub.settings.live_stall_s)

"""A running stream's live annotated view: POST /streams/{id}/live for a ticket, then
GET /streams/{id}/live.mjpeg?ticket=… (an ``<img>`` can show it). See api/live.py."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from api.auth import AUTH_RESPONSES, ReadKey
from api.deps import DbDep, SettingsDep
from api.live import LiveHub, LiveTickets, TicketRefused, TooManyViewers
from core.streams import get_stream
from core.timeouts import within

router = APIRouter(tags=["live"])

BOUNDARY = "lookout-frame"
STATE_CHECK_S = 5.0  # a view with no frame for this long checks that its stream still runs

NOT_RUNNING: dict[int | str, dict[str, Any]] = {
    404: {"description": "No stream has this id"},
    409: {"description": "The stream is shutting down or has ended"},
}


def get_live(request: Request) -> LiveHub:
    hub: LiveHub = request.app.state.live
    return hub


def get_tickets(request: Request) -> LiveTickets:
    tickets: LiveTickets | None = request.app.state.live_tickets
    if tickets is None:
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
    stream_id: uuid.UUID, db: DbDep, settings: SettingsDep, tickets: TicketsDep, _key: ReadKey
) -> LiveTicket:
    """A ticket to the stream's live view: its annotated frames (boxes, track ids, zones, lines) as
    MJPEG, made only while someone watches. Any valid key may watch."""
    await _running_or_error(db, stream_id)
    ticket, expires_at = tickets.issue(str(stream_id))
    return LiveTicket(
        url=f"/streams/{stream_id}/live.mjpeg?ticket={ticket}",
        expires_at=expires_at,
        expires_in_s=settings.live_ticket_ttl_s,
    )


@router.get(
    "/streams/{stream_id}/live.mjpeg",
    response_class=StreamingResponse,
    responses={
        200: {"content": {f"multipart/x-mixed-replace; boundary={BOUNDARY}": {}}, "description": "MJPEG"},
        401: {"description": "Missing, malformed, altered or expired ticket"},
        503: {"description": "This API instance serves its most live views already"},
        **NOT_RUNNING,
    },
)
async def live_view(
    stream_id: uuid.UUID,
    request: Request,
    db: DbDep,
    hub: LiveDep,
    tickets: TicketsDep,
    ticket: Annotated[str, Query(max_length=200, description="from POST /streams/{id}/live")],
) -> StreamingResponse:
    """The stream's annotated frames as they are made (``multipart/x-mixed-replace``), until the
    stream ends or the viewer leaves. A viewer that does not keep up gets the newest frames."""
    try:
        tickets.check(str(stream_id), ticket)
    except TicketRefused as err:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, detail=str(err)) from None
    await _running_or_error(db, stream_id)
    if hub.viewer_count >= hub.settings.live_max_viewers:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, detail="too many live views on this instance"
        )

    async def parts() -> AsyncIterator[bytes]:
        try:
            async with hub.watching(str(stream_id)) as viewer:
                while True:
                    try:
                        jpeg = await within(viewer.frames.get(), STATE_CHECK_S)
                    except TimeoutError:
                        stream = await get_stream(db, stream_id)
                        if stream is None or stream.state.is_shutting_down:
                            return
                        continue
                    yield (
                        (
                            f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n"
                        ).encode()
                        + jpeg
                        + b"\r\n"
                    )
        except TooManyViewers:  # filled up between the check and now
            return

    return StreamingResponse(
        parts(),
        media_type=f"multipart/x-mixed-replace; boundary={BOUNDARY}",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )

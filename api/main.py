"""The Lookout API: the app factory ``create_app`` and the ``lookout-api`` console script."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import make_asgi_app

from api.limits import MaxBodySize, RateLimiter
from api.live import LiveHub, LiveTickets
from api.readiness import TemporalConnection
from api.routes import detections, events, health, keys, live, streams, ui
from core.db import create_pool
from core.logs import configure_logging
from core.sealing import SealingKeyMissing
from core.settings import Settings, get_settings

log = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 5


def create_app(settings: Settings | None = None) -> FastAPI:
    """The FastAPI app; its lifespan opens the Postgres pool (tests run it in-process)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.db = await create_pool(settings)
        app.state.temporal = TemporalConnection(settings)
        app.state.init_limiter = RateLimiter(settings.init_rate_per_minute)
        app.state.live = LiveHub(settings)
        try:
            app.state.live_tickets = LiveTickets(settings)
        except (SealingKeyMissing, OSError):  # no key, or its file unreadable
            app.state.live_tickets = None  # GET and POST of live views answer 503 with the reason
        log.info("api started")
        try:
            yield
        finally:
            await app.state.live.close()
            await app.state.db.close()
            log.info("api stopped")

    app = FastAPI(
        title="Lookout",
        description="Object detection on live RTSP streams. Start a stream with POST /init.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.add_exception_handler(RequestValidationError, validation_error_without_input)  # type: ignore[arg-type]
    routers = (
        streams.router,
        live.router,
        detections.router,
        events.router,
        keys.router,
        health.router,
        ui.router,
    )
    for router in routers:
        app.include_router(router)
    app.add_middleware(MaxBodySize, max_bytes=settings.max_request_bytes)
    app.mount("/metrics", make_asgi_app())
    return app


async def validation_error_without_input(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 body minus the offending input, which may be a URL with credentials."""
    errors = [{k: v for k, v in error.items() if k not in ("input", "url")} for error in exc.errors()]
    return JSONResponse(status_code=422, content={"detail": jsonable_encoder(errors)})


def main() -> None:
    """Serve the API with uvicorn on ``api_host:api_port``."""
    configure_logging("api")
    settings = get_settings()
    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_config=None,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,  # open live views and event feeds end then
    )

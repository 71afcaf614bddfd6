"""Dependencies of the routes: ``DbDep``, ``SettingsDep``, ``TemporalDep`` and ``InitLimiterDep``, set up
by the lifespan."""

from __future__ import annotations

from typing import Annotated, cast

import asyncpg
from fastapi import Depends, Request

from api.limits import RateLimiter
from api.readiness import TemporalConnection
from core.settings import Settings


def get_app_settings(request: Request) -> Settings:
    return cast(Settings, request.app.state.settings)


def get_db(request: Request) -> asyncpg.Pool:
    return cast(asyncpg.Pool, request.app.state.db)


def get_temporal(request: Request) -> TemporalConnection:
    return cast(TemporalConnection, request.app.state.temporal)


def get_init_limiter(request: Request) -> RateLimiter:
    return cast(RateLimiter, request.app.state.init_limiter)


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
DbDep = Annotated[asyncpg.Pool, Depends(get_db)]
TemporalDep = Annotated[TemporalConnection, Depends(get_temporal)]
InitLimiterDep = Annotated[RateLimiter, Depends(get_init_limiter)]

"""Liveness and readiness: /healthz answers while the process runs, /readyz checks its dependencies."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response, status
from pydantic import BaseModel

from api.deps import DbDep, SettingsDep, TemporalDep
from api.readiness import check_kafka, check_postgres, check_temporal, run_check

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str  # "ready" or "not ready"
    checks: dict[str, str]  # dependency -> "ok" or "error: <type>"


@router.get("/healthz")
async def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", responses={503: {"model": Readiness, "description": "A dependency is unreachable"}})
async def readyz(db: DbDep, settings: SettingsDep, temporal: TemporalDep, response: Response) -> Readiness:
    """Ready when Postgres, the broker and Temporal all answer."""
    names = ("postgres", "kafka", "temporal")
    results = await asyncio.gather(
        run_check("postgres", check_postgres(db)),
        run_check("kafka", check_kafka(settings)),
        run_check("temporal", check_temporal(temporal)),
    )
    checks = dict(zip(names, results, strict=True))
    ready = all(result == "ok" for result in results)
    if not ready:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return Readiness(status="ready" if ready else "not ready", checks=checks)

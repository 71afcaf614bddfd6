"""``lookout init|shutdown|state|streams|results``: the user's commands, each one call to the HTTP API.

The API answers with JSON; these commands print it as it is (``streams`` as a table). An error the
API answers with becomes ``ApiError``, which ``cli.main`` reports with exit code 2.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import httpx
import typer
from rich.text import Text

from cli.api_client import LookoutClient
from cli.output import column_table, say, say_json
from core.settings import get_settings

streams_app = typer.Typer()

ApiOption = Annotated[
    str | None,
    typer.Option("--api", help="API base URL (default http://LOOKOUT_API_HOST:LOOKOUT_API_PORT)"),
]
StreamId = Annotated[str, typer.Argument(metavar="ID", help="The stream id that `lookout init` returned")]


@contextmanager
def api_client(api: str | None) -> Iterator[LookoutClient]:
    """A client of the API at ``api``, else at the configured host and port; closed afterwards."""
    settings = get_settings()
    base_url = api or f"http://{settings.api_host}:{settings.api_port}"
    client = LookoutClient(base_url)
    try:
        yield client
    except httpx.TransportError as exc:  # say where it looked: a wrong --api is the usual cause
        raise RuntimeError(f"no answer from the API at {base_url}: {exc}") from exc
    finally:
        client.close()


def stream_options(
    fps: float | None, confidence: float | None, classes: str | None, imgsz: int | None
) -> dict[str, Any]:
    """The ``options`` of ``POST /init``: only those given, so the API's defaults apply to the rest."""
    given = {
        "fps": fps,
        "confidence": confidence,
        "classes": classes.split(",") if classes else None,
        "imgsz": imgsz,
    }
    return {name: value for name, value in given.items() if value is not None}


@streams_app.command()
def init(
    url: Annotated[str, typer.Argument(help="rtsp:// or rtsps:// URL")],
    fps: Annotated[float | None, typer.Option(help="frames per second to sample")] = None,
    confidence: Annotated[float | None, typer.Option(help="minimum confidence of a detection")] = None,
    classes: Annotated[
        str | None, typer.Option(help="comma-separated class names to keep, e.g. person,car")
    ] = None,
    imgsz: Annotated[int | None, typer.Option(help="the model's input size in pixels")] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="a retry with the same key returns the same stream")
    ] = None,
    api: ApiOption = None,
) -> None:
    """Start a stream."""
    with api_client(api) as client:
        options = stream_options(fps, confidence, classes, imgsz)
        say_json(client.init(url, options, idempotency_key=idempotency_key))


@streams_app.command()
def shutdown(stream_id: StreamId, api: ApiOption = None) -> None:
    """Stop a stream."""
    with api_client(api) as client:
        say_json(client.shutdown(stream_id))


@streams_app.command()
def state(stream_id: StreamId, api: ApiOption = None) -> None:
    """A stream's lifecycle state, error reason and timestamps."""
    with api_client(api) as client:
        say_json(client.state(stream_id))


@streams_app.command("streams")
def list_streams(api: ApiOption = None) -> None:
    """Every stream with its state and health (URLs shown redacted)."""
    with api_client(api) as client:
        streams = client.streams()["streams"]
    table = column_table("ID", "STATE", "HEALTH", "URL", "ERROR")
    for stream in streams:
        cells = (
            stream["id"],
            stream["state"],
            health_summary(stream),
            stream["url_redacted"],
            stream.get("error_reason") or "",
        )
        table.add_row(*(Text(str(cell)) for cell in cells))
    say(table)


def health_summary(stream: dict[str, Any]) -> str:
    """``ml ok, runner camera_unreachable (2 restarts)``, or ``-`` without health."""
    services = (stream.get("health") or {}).get("services") or {}
    parts = []
    for name, service in sorted(services.items()):
        restarts = f" ({service['restarts']} restarts)" if service.get("restarts") else ""
        parts.append(f"{name} {service['status']}{restarts}")
    return ", ".join(parts) or "-"


@streams_app.command()
def results(
    stream_id: StreamId,
    limit: Annotated[int, typer.Option(help="detections to show")] = 10,
    cursor: Annotated[str | None, typer.Option(help="`next_cursor` of the previous page")] = None,
    api: ApiOption = None,
) -> None:
    """A stream's newest detections with fresh links to the annotated images."""
    with api_client(api) as client:
        say_json(client.results(stream_id, limit=limit, cursor=cursor))

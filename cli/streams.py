"""``lookout init|shutdown|state|streams|results|live``: the user's commands, each one call to the HTTP API.

The API answers with JSON; these commands print it as it is (``streams`` as a table). An error the
API answers with becomes ``ApiError``, which ``cli.main`` reports with exit code 2.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import httpx
import typer
from rich.text import Text

from cli.api_client import LookoutClient
from cli.output import column_table, say, say_json
from core.api_keys import Scope
from core.api_keys import create_key as create_key_in_db
from core.db import create_pool
from core.settings import Settings, get_settings

streams_app = typer.Typer()

ApiOption = Annotated[
    str | None,
    typer.Option("--api", help="API base URL (default http://LOOKOUT_API_HOST:LOOKOUT_API_PORT)"),
]
StreamId = Annotated[str, typer.Argument(metavar="ID", help="The stream id that `lookout init` returned")]


def configured_api_key(settings: Settings) -> str | None:
    """The key the command sends: ``LOOKOUT_API_KEY``, else the embedded stack's ``.lookout/api-key``."""
    key = settings.api_key.get_secret_value()
    if key:
        return key
    path = settings.data_dir / "api-key"
    return path.read_text().strip() if path.exists() else None


@contextmanager
def api_client(api: str | None) -> Iterator[LookoutClient]:
    """A client of the API at ``api``, else at the configured host and port; closed afterwards."""
    settings = get_settings()
    base_url = api or f"http://{settings.api_host}:{settings.api_port}"
    client = LookoutClient(base_url, api_key=configured_api_key(settings))
    try:
        yield client
    except httpx.TransportError as exc:  # say where it looked: a wrong --api is the usual cause
        raise RuntimeError(f"no answer from the API at {base_url}: {exc}") from exc
    finally:
        client.close()


def stream_options(
    fps: float | None,
    confidence: float | None,
    classes: str | None,
    imgsz: int | None,
    model: str | None = None,
) -> dict[str, Any]:
    """The ``options`` of ``POST /init``: only those given, so the API's defaults apply to the rest."""
    given = {
        "fps": fps,
        "confidence": confidence,
        "classes": classes.split(",") if classes else None,
        "imgsz": imgsz,
        "model": model,
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
    model: Annotated[
        str | None, typer.Option(help="a model registered with the ML service (LOOKOUT_ML_WEIGHTS)")
    ] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="a retry with the same key returns the same stream")
    ] = None,
    api: ApiOption = None,
) -> None:
    """Start a stream."""
    with api_client(api) as client:
        options = stream_options(fps, confidence, classes, imgsz, model)
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


@streams_app.command()
def live(stream_id: StreamId, api: ApiOption = None) -> None:
    """A link to the stream's live annotated view (MJPEG: a browser, VLC or ffplay shows it); open
    it within LOOKOUT_LIVE_TICKET_TTL_S (60 s), it then stays open while the stream runs."""
    with api_client(api) as client:
        say(client.absolute(client.live(stream_id)["url"]))


@streams_app.command("streams")
def list_streams(
    state: Annotated[str | None, typer.Option(help="only streams in this state, e.g. ml_started")] = None,
    running: Annotated[
        bool | None, typer.Option("--running/--ended", help="only running streams, or only ended ones")
    ] = None,
    search: Annotated[
        str | None, typer.Option("--search", "-s", help="id or redacted URL contains this")
    ] = None,
    limit: Annotated[int, typer.Option(help="streams per page")] = 50,
    every: Annotated[bool, typer.Option("--all", help="every page, not only the first")] = False,
    api: ApiOption = None,
) -> None:
    """Streams with their state and health, running ones first, then by recency (URLs redacted)."""
    streams: list[dict[str, Any]] = []
    cursor = None
    with api_client(api) as client:
        while True:
            page = client.streams(state=state, running=running, q=search, limit=limit, cursor=cursor)
            streams += page["streams"]
            cursor = page.get("next_cursor")
            if cursor is None or not every:
                break
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
    if cursor is not None:
        say(f"more streams: --all for every page (next cursor {cursor})")


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


@streams_app.command()
def storage(api: ApiOption = None) -> None:
    """What the stored frames take, per stream and in total, against the budget, and when it fills."""
    with api_client(api) as client:
        view = client.storage()
    rate = view["stored_bytes_per_day"]
    say(
        f"{human_bytes(view['bytes'])} of {human_bytes(view['budget_bytes'])} ({view['used_fraction']:.0%}),"
        f" {view['frames']} frames, {view['pending_deletions']} deletions pending;"
        f" storing {human_bytes(rate) + ' a day' if rate else 'nothing lately'}; {forecast(view['days_until_full'])}"
    )
    table = column_table("STREAM", "FRAMES", "BYTES", "OLDEST", "DELETED", "LAST REASON")
    for s in view["streams"]:
        age = s["oldest_frame_age_s"]
        cells = (
            s["stream_id"],
            s["frames"],
            human_bytes(s["bytes"]),
            "-" if age is None else human_duration(age),
            f"{s['deleted_frames']} frames, {s['deleted_events']} events",
            s["last_deletion_reason"] or "",
        )
        table.add_row(*(Text(str(cell)) for cell in cells))
    say(table)


@streams_app.command("delete")
def delete_stream(stream_id: StreamId, api: ApiOption = None) -> None:
    """Delete an inactive stream with its frames and events (the janitor deletes them, then it)."""
    with api_client(api) as client:
        say_json(client.delete_stream(stream_id))


def forecast(days: float | None) -> str:
    if days is None:
        return "the budget is not filling"
    if days == 0:
        return "budget reached: the oldest frames go as new ones come"
    return f"the budget is reached in {days:.1f} days"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


keys_app = typer.Typer(help="API keys: create (the token is shown once), list, revoke.")


@keys_app.command("create")
def create_key(
    name: Annotated[str, typer.Option(help="Who or what uses the key")],
    scope: Annotated[
        str, typer.Option(help="read (state, streams, results) or admin (also init, shutdown, keys)")
    ] = "read",
    api: ApiOption = None,
) -> None:
    """Create an API key and print it with its token (shown this once)."""
    with api_client(api) as client:
        say_json(client.create_key(name, scope))


@keys_app.command("list")
def list_keys(api: ApiOption = None) -> None:
    """Every API key, revoked ones included (never a token)."""
    with api_client(api) as client:
        keys = client.keys()["keys"]
    table = column_table("ID", "NAME", "SCOPE", "PREFIX", "CREATED", "REVOKED")
    for key in keys:
        cells = (
            key["id"],
            key["name"],
            key["scope"],
            key["prefix"],
            key["created_at"],
            key.get("revoked_at") or "",
        )
        table.add_row(*(Text(str(cell)) for cell in cells))
    say(table)


@keys_app.command("revoke")
def revoke_key(
    key_id: Annotated[str, typer.Argument(help="The key's id (`lookout keys list`)")], api: ApiOption = None
) -> None:
    """Revoke an API key: calls with it are refused from now on."""
    with api_client(api) as client:
        say_json(client.revoke_key(key_id))


@keys_app.command("bootstrap")
def bootstrap_key(name: Annotated[str, typer.Option(help="Who or what uses the key")] = "admin") -> None:
    """Create an admin key straight in the database (LOOKOUT_DATABASE_URL): the first one, before
    any key can call the API. Prints its token, once."""
    settings = get_settings()

    async def create() -> str:
        pool = await create_pool(settings)
        try:
            _key, token = await create_key_in_db(pool, name=name, scope=Scope.ADMIN)
            return token
        finally:
            await pool.close()

    say(asyncio.run(create()))

"""``lookout``: the product's command line, one typer app.

- ``lookout stack ...``: the embedded local stack (``cli.stack``);
- ``lookout db migrate``: the schema, what compose's ``migrate`` job runs;
- ``lookout up`` / ``lookout demo``: the stack, every service and (demo) a camera (``cli.run``);
- ``lookout init|shutdown|state|streams|results``: the user's calls to the API (``cli.streams``).

Exit codes: 0 done, 1 a failing ``stack status`` or an unexpected error (one line on stderr, the
trace in ``<data_dir>/logs/lookout.log``), 2 an error the API answered with (``lookout: HTTP 404: ...``).
"""

from __future__ import annotations

import asyncio
import logging
from io import TextIOWrapper
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from cli.api_client import ApiError
from cli.output import say
from cli.stack import stack_app
from cli.streams import keys_app, streams_app
from core.db import create_pool
from core.logs import JsonFormatter, configure_logging
from core.sealing import SealingKeyMissing, seal_stored_urls
from core.settings import Settings, get_settings

log = logging.getLogger("lookout")

app = typer.Typer(
    name="lookout",
    help="Lookout: object detection on live RTSP streams.",
    no_args_is_help=True,
    add_completion=False,
    # an unexpected error is reported by main() in one line; the trace belongs in the log file
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(name="db", help="The database schema.", no_args_is_help=True)
kafka_app = typer.Typer(name="kafka", help="Lookout's Kafka topics.", no_args_is_help=True)
app.add_typer(stack_app)
app.add_typer(db_app)
app.add_typer(kafka_app)
app.add_typer(streams_app)
app.add_typer(keys_app, name="keys")


@db_app.command()
def migrate() -> None:
    """Apply the Alembic migrations to LOOKOUT_DATABASE_URL."""
    from core.db import migrate as migrate_schema

    # compose runs this in a container: its log records belong on stderr, for the orchestrator
    configure_logging("lookout", level="WARNING")
    settings = get_settings()
    migrate_schema(settings.database_url.get_secret_value())
    say("schema migrated to head")
    try:
        sealed = asyncio.run(_seal_stored_urls(settings))
    except SealingKeyMissing:
        say("no secret key configured: camera URLs stored in clear by an earlier release stay so")
    else:
        say(f"camera URLs sealed with the current secret key: {sealed}")


@kafka_app.command("topics")
def kafka_topics() -> None:
    """Create Lookout's topics at LOOKOUT_KAFKA_BOOTSTRAP, or reconcile them with their declaration
    (partitions, retention, compression: core/topics.py)."""
    from core.kafka import ensure_topics

    configure_logging("lookout", level="WARNING")  # compose runs it: logs to stderr
    changes = asyncio.run(ensure_topics(get_settings()))
    for change in changes:
        say(change)
    say("topics as declared" if not changes else f"{len(changes)} change(s) made")


async def _seal_stored_urls(settings: Settings) -> int:
    pool = await create_pool(settings)
    try:
        return await seal_stored_urls(pool, settings)
    finally:
        await pool.close()


@app.command()
def up() -> None:
    """The stack and every Lookout service, for real cameras (Ctrl-C stops)."""
    from cli.run import run_up  # the stack's and services' imports, only for the commands that run them

    run_up(get_settings())


@app.command()
def demo(
    fps: Annotated[float, typer.Option(help="frames per second to sample")] = 5.0,
) -> None:
    """The main job: stack, services, the demo camera and a stream for it."""
    from cli.run import run_demo

    run_demo(get_settings(), fps=fps)


class _FileOnFirstRecord(logging.FileHandler):
    """A log file (and its folder) made only when the first record comes: ``lookout state`` makes none."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, delay=True)

    def _open(self) -> TextIOWrapper:
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


def log_file() -> Path:
    """Where this process's own log records go: ``<data_dir>/logs/lookout.log``, beside the services' logs."""
    return get_settings().data_dir.resolve() / "logs" / "lookout.log"


def log_to_file(path: Path) -> None:
    """Send this process's log records to ``path`` as JSON lines, so the terminal shows only the output."""
    configure_logging("lookout")  # LOOKOUT_LOG_LEVEL, the quiet libraries, the JSON format
    handler = _FileOnFirstRecord(path)
    handler.setFormatter(JsonFormatter("lookout"))
    logging.getLogger().handlers[:] = [handler]


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _where_logged() -> str:
    files = [h.baseFilename for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    return f" (details in {files[0]})" if files else ""


def _fail(code: int, message: str) -> NoReturn:
    typer.echo(f"lookout: {message}", err=True)
    raise SystemExit(code)


def main() -> None:
    """The ``lookout`` console script."""
    try:
        path = log_file()
    except Exception as exc:  # settings that do not parse: there is no data folder to log to yet
        _fail(1, f"bad settings: {_one_line(exc)}")
    log_to_file(path)
    try:
        app()
    except ApiError as exc:
        _fail(2, str(exc))
    except Exception as exc:
        log.exception("command failed")
        _fail(1, _one_line(exc) + _where_logged())


if __name__ == "__main__":
    main()

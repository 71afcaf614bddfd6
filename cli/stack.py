"""``lookout stack up|down|status``: the embedded local stack, as a table of its parts."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer
from rich.table import Table
from rich.text import Text

from cli.output import column_table, say
from core.settings import get_settings

if TYPE_CHECKING:
    from deploy.local_stack import LocalStack, PartStatus

stack_app = typer.Typer(
    name="stack",
    help="The embedded local stack (Postgres, S3, Kafka broker, Temporal).",
    no_args_is_help=True,
)


def parts_table(parts: list[PartStatus]) -> Table:
    """The parts with their address, health, pid and what happened to them (columns PART ... NOTE)."""
    table = column_table("PART", "ADDRESS", "HEALTH", "PID", "NOTE")
    for part in parts:
        health = Text("ok", style="green") if part.healthy else Text("down", style="bold red")
        table.add_row(
            Text(part.name), Text(part.address), health, Text(str(part.pid or "-")), Text(part.note)
        )
    return table


def local_stack() -> LocalStack:
    """The embedded stack of the configured settings."""
    # imported here: its servers' clients take a second to import, which `lookout state` need not wait
    from deploy.local_stack import LocalStack

    return LocalStack(get_settings())


@stack_app.command()
def up() -> None:
    """Start what is not running (idempotent), migrate, create topics and buckets."""
    stack = local_stack()
    parts = stack.up()
    for notice in stack.notices:
        say(f"note: {notice}")
    say(parts_table(parts))


@stack_app.command()
def down() -> None:
    """Stop only what `stack up` started."""
    parts = local_stack().down()
    say(parts_table(parts) if parts else "nothing started by this stack is running")


@stack_app.command()
def status() -> None:
    """Each part with its address and health; exit code 1 when one is down."""
    parts = local_stack().status()
    say(parts_table(parts))
    if not all(part.healthy for part in parts):
        raise typer.Exit(1)

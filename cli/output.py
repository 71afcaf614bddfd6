"""What the ``lookout`` command writes for its user: lines, tables and JSON bodies on stdout.

One rich console for the whole process. Markup, highlighting and emoji codes are off, so a stream
URL or an error reason with brackets or colons is printed as it is. When stdout is not a terminal
(a pipe, a file, a test) nothing is wrapped: scripts read whole lines.
"""

from __future__ import annotations

import json

import typer
from rich.console import Console, RenderableType
from rich.table import Table

console = Console(markup=False, highlight=False, emoji=False, soft_wrap=True)
if not console.is_terminal:
    # no terminal width to fit; rich would otherwise wrap tables at 80 columns
    console.width = 10_000


def say(line: RenderableType = "") -> None:
    """Write one line (or a table) for the user."""
    console.print(line)


def say_json(body: object) -> None:
    """Write an API response body as indented JSON, exactly as the API returned it."""
    # typer.echo, not the rich console: the JSON must stay parseable, uncoloured and unwrapped
    typer.echo(json.dumps(body, indent=2, default=str))


def column_table(*headers: str) -> Table:
    """A borderless table whose rows start at the line's first column (scripts match them by prefix)."""
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for header in headers:
        table.add_column(header, no_wrap=True)
    return table

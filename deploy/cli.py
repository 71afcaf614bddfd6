"""``lookout``: the command line of the embedded stack and of the database schema."""

from __future__ import annotations

import argparse
import logging
import sys

from core.logs import configure_logging
from core.settings import get_settings
from deploy.local_stack import LocalStack, PartStatus


def _print_table(parts: list[PartStatus]) -> None:
    rows = [("PART", "ADDRESS", "HEALTH", "PID", "NOTE")]
    rows += [(p.name, p.address, "ok" if p.healthy else "down", str(p.pid or "-"), p.note) for p in parts]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for row in rows:
        sys.stdout.write(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n"
        )


def _stack(args: argparse.Namespace) -> int:
    stack = LocalStack(get_settings())
    if args.action == "up":
        _print_table(stack.up())
        return 0
    if args.action == "down":
        parts = stack.down()
        _print_table(parts) if parts else sys.stdout.write("nothing started by this stack is running\n")
        return 0
    parts = stack.status()
    _print_table(parts)
    return 0 if all(p.healthy for p in parts) else 1


def _db(args: argparse.Namespace) -> int:
    from core.db import migrate

    migrate(get_settings().database_url.get_secret_value())
    sys.stdout.write("schema migrated to head\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lookout", description="Lookout: object detection on live RTSP streams"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    stack = sub.add_parser("stack", help="the embedded local stack (Postgres, S3, Kafka broker, Temporal)")
    stack.add_argument("action", choices=["up", "down", "status"])
    stack.set_defaults(handler=_stack)

    db = sub.add_parser("db", help="database schema")
    db.add_argument("action", choices=["migrate"])
    db.set_defaults(handler=_db)
    return parser


def main(argv: list[str] | None = None) -> int:
    configure_logging("cli", level="WARNING")
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except Exception as exc:  # a clear line for the user, the trace in the log
        logging.getLogger("lookout").exception("command failed")
        sys.stderr.write(f"lookout: {exc}\n")
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())

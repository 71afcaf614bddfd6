"""``lookout``: the command line of the embedded stack and of the database schema."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from api.client import ApiError, LookoutClient
from core.logs import configure_logging
from core.settings import get_settings
from deploy.local_stack import JUICEFS_DIR, LocalStack, PartStatus


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
        parts = stack.up()
        for notice in stack.notices:
            sys.stdout.write(f"note: {notice}\n")
        _print_table(parts)
        return 0
    if args.action == "import-juicefs":
        copied = stack.import_juicefs()
        for bucket, count in copied.items():
            sys.stdout.write(f"{bucket}: {count} object(s) copied\n")
        sys.stdout.write(f"done; {stack.data_dir / JUICEFS_DIR} can be deleted\n")
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


def _api_client(args: argparse.Namespace) -> LookoutClient:
    settings = get_settings()
    return LookoutClient(args.api or f"http://{settings.api_host}:{settings.api_port}")


def _print_json(body: object) -> None:
    sys.stdout.write(json.dumps(body, indent=2, default=str) + "\n")


def _user_command(args: argparse.Namespace) -> int:
    client = _api_client(args)
    try:
        if args.command == "init":
            options = {
                k: v
                for k, v in {
                    "fps": args.fps,
                    "confidence": args.confidence,
                    "classes": args.classes.split(",") if args.classes else None,
                    "imgsz": args.imgsz,
                }.items()
                if v is not None
            }
            _print_json(client.init(args.url, options, idempotency_key=args.idempotency_key))
        elif args.command == "shutdown":
            _print_json(client.shutdown(args.id))
        elif args.command == "state":
            _print_json(client.state(args.id))
        elif args.command == "streams":
            streams = client.streams()["streams"]
            rows = [("ID", "STATE", "URL", "ERROR")]
            rows += [(s["id"], s["state"], s["url_redacted"], s.get("error_reason") or "") for s in streams]
            widths = [max(len(r[i]) for r in rows) for i in range(4)]
            for row in rows:
                line = "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
                sys.stdout.write(line.rstrip() + "\n")
        elif args.command == "results":
            _print_json(client.results(args.id, limit=args.limit, cursor=args.cursor))
    except ApiError as exc:
        sys.stderr.write(f"lookout: {exc}\n")
        return 2
    finally:
        client.close()
    return 0


def _run(args: argparse.Namespace) -> int:
    from deploy.demo import run_demo, run_up

    configure_logging("lookout", level="INFO")
    if args.command == "demo":
        return run_demo(get_settings(), fps=args.fps)
    return run_up(get_settings())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lookout", description="Lookout: object detection on live RTSP streams"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    stack = sub.add_parser("stack", help="the embedded local stack (Postgres, S3, Kafka broker, Temporal)")
    stack.add_argument("action", choices=["up", "down", "status", "import-juicefs"])
    stack.set_defaults(handler=_stack)

    db = sub.add_parser("db", help="database schema")
    db.add_argument("action", choices=["migrate"])
    db.set_defaults(handler=_db)

    demo = sub.add_parser("demo", help="the main job: stack, services, the demo camera and a stream for it")
    demo.add_argument("--fps", type=float, default=5.0, help="frames per second to sample (default 5)")
    demo.set_defaults(handler=_run)
    up = sub.add_parser("up", help="the stack and every Lookout service, for real cameras (Ctrl-C stops)")
    up.set_defaults(handler=_run)

    api_help = "API base URL (default http://LOOKOUT_API_HOST:LOOKOUT_API_PORT)"
    init = sub.add_parser("init", help="start a stream")
    init.add_argument("url", help="rtsp:// or rtsps:// URL")
    init.add_argument("--fps", type=float)
    init.add_argument("--confidence", type=float)
    init.add_argument("--classes", help="comma-separated class names to keep, e.g. person,car")
    init.add_argument("--imgsz", type=int)
    init.add_argument("--idempotency-key")
    for name, help_text in (("shutdown", "stop a stream"), ("state", "a stream's lifecycle state")):
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("id")
    results = sub.add_parser("results", help="a stream's newest detections with links to the images")
    results.add_argument("id")
    results.add_argument("--limit", type=int, default=10)
    results.add_argument("--cursor")
    streams = sub.add_parser("streams", help="every stream with its state")
    for cmd in (init, streams, results, sub.choices["shutdown"], sub.choices["state"]):
        cmd.add_argument("--api", help=api_help)
        cmd.set_defaults(handler=_user_command)
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

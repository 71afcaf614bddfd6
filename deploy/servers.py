"""The real servers of the embedded stack: how each one is started, checked and stopped.

Both the ``lookout stack`` command (detached, long-lived, pid files) and the test fixtures
(throw-away servers on free ports) start servers through this module, so there is one recipe for
each part.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
import psycopg
import urllib3
from aiokafka import AIOKafkaClient
from minio import Minio
from minio.error import MinioException, S3Error
from paho.mqtt.enums import CallbackAPIVersion

from core.lifetime import terminate_with_parent
from core.timeouts import within

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


S3_READY_BUCKET = "lookout-ready"


def s3_ok(endpoint: str, access_key: str, secret_key: str, timeout: float = 2.0) -> bool:
    """True when the S3 server stores an object and hands it back (a port answering is not enough:
    SeaweedFS answers 500 for a few seconds after it opens its ports)."""
    client = Minio(
        endpoint,
        access_key=access_key,
        secret_key=secret_key,
        secure=False,
        http_client=urllib3.PoolManager(timeout=timeout, retries=False),
    )
    body = uuid.uuid4().bytes
    try:
        if not client.bucket_exists(S3_READY_BUCKET):
            with contextlib.suppress(S3Error):  # made meanwhile by another check
                client.make_bucket(S3_READY_BUCKET)
        client.put_object(S3_READY_BUCKET, "probe", io.BytesIO(body), len(body))
        response = client.get_object(S3_READY_BUCKET, "probe")
        try:
            return response.read() == body
        finally:
            response.close()
            response.release_conn()
    except (S3Error, MinioException, urllib3.exceptions.HTTPError, OSError, ValueError):
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
                preexec_fn=terminate_with_parent if die_with_parent else None,
            )
        try:
            wait_ready(self, proc, timeout)
        except BaseException:
            stop_process_group(proc.pid)
            raise
        return proc


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


def seaweed_compact_url(s3_port: int, garbage_threshold: float = 0.2) -> str:
    """The master's vacuum call: it compacts every volume more than ``garbage_threshold`` deleted.
    ``weed mini`` runs no vacuum of its own (its master's ``-master.vacuumIntervalSeconds`` does
    nothing there), so the storage janitor calls this after deleting frames."""
    return (
        f"http://127.0.0.1:{seaweed_ports(s3_port)['master']}/vol/vacuum?garbageThreshold={garbage_threshold}"
    )


def s3_server(data_dir: Path, port: int, access_key: str, secret_key: str) -> ServerSpec:
    """SeaweedFS (``weed mini``: master, volume, filer and S3 in one process) on 127.0.0.1 only.

    Every port is named so nothing binds 0.0.0.0 (its defaults open about 13 ports, 9101 among
    them), and telemetry is off. Ready means an object can be written and read back (``s3_ok``):
    right after a start its S3 port answers 500 for a few seconds. ``port`` is the S3 port;
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
        ready=lambda: s3_ok(f"127.0.0.1:{port}", access_key, secret_key),
        log_path=data_dir.parent / "logs" / "s3.log",
        prepare=prepare,
    )


KAFKA_POM = Path(__file__).parent / "kafka" / "pom.xml"
KAFKA_LOG4J = Path(__file__).parent / "kafka" / "log4j2.xml"


def kafka_version() -> str:
    """The Apache Kafka version the embedded stack runs: the one ``deploy/kafka/pom.xml`` pins."""
    match = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", KAFKA_POM.read_text())
    assert match, f"no <kafka.version> in {KAFKA_POM}"
    return match.group(1)


def kafka_libs() -> Path:
    """The folder of the broker's jars that ``deploy/bootstrap.sh`` fetched (``LOOKOUT_KAFKA_LIBS`` wins)."""
    configured = os.environ.get("LOOKOUT_KAFKA_LIBS")
    libs = (
        Path(configured)
        if configured
        else Path(sys.prefix) / "share" / "lookout-kafka" / kafka_version() / "libs"
    )
    if not any(libs.glob("kafka_2.13-*.jar")):
        raise ServerError(f"no Kafka broker jars in {libs}: run deploy/bootstrap.sh (make demo or make test)")
    return libs


def java_bin() -> str:
    """The JDK's ``java`` (``JAVA_HOME`` when set, else the one on PATH)."""
    home = os.environ.get("JAVA_HOME")
    found = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not found or not Path(found).exists():
        raise ServerError("java not found: Kafka needs a JDK 17 (apt-get install openjdk-17-jre-headless)")
    return found


def kafka_ok(bootstrap: str, timeout: float = 2.0) -> bool:
    """True when the broker answers a metadata request and lists itself (it is past its start-up).

    Callable with or without an event loop running in the calling thread (the check runs on a loop
    of its own, on a thread of its own when one is running here)."""

    async def ask() -> bool:
        client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
        try:
            await client.bootstrap()
            return bool(client.cluster.brokers())
        finally:
            await client.close()

    def check() -> bool:
        try:
            return asyncio.run(within(ask(), timeout))
        except Exception:  # refused, timed out, not ready: all mean "not yet"
            return False

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return check()
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(check).result()


def kafka_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes in URL-safe base64 without padding, as Kafka makes them."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):  # Kafka's own ids never start with a dash (it reads as a flag)
            return cluster_id


def kafka_broker(
    data_dir: Path,
    port: int,
    *,
    controller_port: int | None = None,
    heap_mb: int = 512,
    max_message_bytes: int = 16 * 1024 * 1024,
    retention_check_ms: int = 1000,
) -> ServerSpec:
    """Apache Kafka in KRaft mode: one combined broker and controller on 127.0.0.1, its log on disk.

    The storage in ``data_dir/log`` is formatted once (``StorageTool format --standalone``); later
    starts reuse it, so topics, records and committed offsets survive a restart. The JVM heap is
    bounded (``heap_mb``). ``controller_port`` defaults to ``port + 1``. Ready when a metadata
    request answers with the broker in it.
    """
    controller_port = controller_port or port + 1
    log_dirs = data_dir / "log"
    properties = data_dir / "server.properties"
    config = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.bootstrap.servers": f"127.0.0.1:{controller_port}",
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(log_dirs),
        # topics come from Lookout's declaration (core/topics.py), never from a typo's first use
        "auto.create.topics.enable": "false",
        # one box: one replica of everything, Kafka's own topics included
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "10",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        # frames are whole JPEGs (LOOKOUT_KAFKA_MAX_REQUEST_SIZE)
        "message.max.bytes": str(max_message_bytes),
        "socket.request.max.bytes": str(max(104857600, 2 * max_message_bytes)),
        # retention by time and bytes is checked this often (Kafka's default is 5 minutes), and from
        # 5 s after a start on (Kafka waits 30 s: a box restarted under load would overshoot its
        # topics' byte bounds meanwhile)
        "log.retention.check.interval.ms": str(retention_check_ms),
        "log.initial.task.delay.ms": "5000",
        # two cores: fewer threads than a data-centre broker's defaults
        "num.network.threads": "2",
        "num.io.threads": "4",
        "background.threads": "4",
        "num.recovery.threads.per.data.dir": "2",
    }
    libs = kafka_libs()
    java = java_bin()
    classpath = f"{libs}/*"

    def prepare() -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        properties.write_text("".join(f"{key}={value}\n" for key, value in config.items()))
        if (log_dirs / "meta.properties").exists():
            return
        subprocess.run(
            [
                java,
                "-cp",
                classpath,
                f"-Dlog4j2.configurationFile={KAFKA_LOG4J}",
                "kafka.tools.StorageTool",
                "format",
                "--standalone",
                "--cluster-id",
                kafka_cluster_id(),
                "--config",
                str(properties),
            ],
            check=True,
            capture_output=True,
        )

    bootstrap = f"127.0.0.1:{port}"
    return ServerSpec(
        name="kafka",
        argv=[
            java,
            f"-Xms{min(128, heap_mb)}m",
            f"-Xmx{heap_mb}m",
            "-XX:+UseSerialGC",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={KAFKA_LOG4J}",
            f"-Dkafka.logs.dir={data_dir.parent / 'logs'}",
            "-cp",
            classpath,
            "kafka.Kafka",
            str(properties),
        ],
        address=bootstrap,
        ready=lambda: kafka_ok(bootstrap),
        log_path=data_dir.parent / "logs" / "kafka.log",
        prepare=prepare,
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


def mqtt_ok(
    port: int,
    username: str,
    password: str,
    host: str = "127.0.0.1",
    timeout: float = 2.0,
    *,
    tls: bool = False,
) -> bool:
    """Whether an MQTT client can connect with these credentials (CONNACK accepted); ``tls``: over
    TLS, the certificate unchecked (the readiness of our own listener)."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"lookout-ready-{os.getpid()}")
    client.username_pw_set(username, password)
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        client.tls_set_context(context)
    try:
        client.connect(host, port, keepalive=5)
        deadline = time.monotonic() + timeout
        while not client.is_connected() and time.monotonic() < deadline:
            client.loop(timeout=0.1)
        return client.is_connected()
    except OSError:
        return False
    finally:
        with contextlib.suppress(Exception):
            client.disconnect()


def mosquitto_server(
    data_dir: Path, port: int, username: str, password: str, tls: tuple[Path, Path] | None = None
) -> ServerSpec:
    """Debian's Mosquitto on 127.0.0.1 with one user (a password file), persistence saved on every
    change (a broker killed -9 keeps its sessions and retained messages); with ``tls`` (certificate
    and key files) its listener speaks TLS only."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    conf = data_dir / "mosquitto.conf"
    password_file = data_dir / "passwords"

    def prepare() -> None:
        if not Path(binary).exists():
            raise ServerError("no Mosquitto: apt-get install mosquitto")
        (data_dir / "data").mkdir(parents=True, exist_ok=True)
        password_file.unlink(missing_ok=True)
        # the password never on a command line (ps shows those): written to a private file, hashed there
        fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as plain:
            plain.write(f"{username}:{password}\n")
        hashed = subprocess.run([passwd, "-U", str(password_file)], capture_output=True, text=True)
        if hashed.returncode != 0:
            raise ServerError(f"mosquitto_passwd failed: {hashed.stderr.strip()[:200]}")
        conf.write_text(
            "\n".join(
                [
                    "per_listener_settings false",
                    f"listener {port} 127.0.0.1",
                    *([f"certfile {tls[0]}", f"keyfile {tls[1]}"] if tls else []),
                    "allow_anonymous false",
                    f"password_file {password_file}",
                    "persistence true",
                    f"persistence_location {data_dir / 'data'}/",
                    "autosave_on_changes true",
                    "autosave_interval 1",
                    f"user {pwd.getpwuid(os.geteuid()).pw_name}",
                    "log_dest stdout",
                    "log_type error",
                    "log_type warning",
                    "log_type notice",
                    "",
                ]
            )
        )

    return ServerSpec(
        name="mqtt",
        argv=[binary, "-c", str(conf)],
        address=f"mqtt://127.0.0.1:{port}",
        ready=lambda: mqtt_ok(port, username, password, tls=tls is not None),
        log_path=data_dir.parent / "logs" / "mosquitto.log",
        prepare=prepare,
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

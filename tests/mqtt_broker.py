"""A real Mosquitto for tests (the stack's recipe) that can be killed -9 and started again on the same
port and data, a real MQTT client that records everything it receives across reconnects, TLS
certificates, and ``lookout-mqtt`` as a process."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from core.settings import Settings, settings_env
from deploy import servers

log = logging.getLogger(__name__)

USER = "lookout"
PASSWORD = "test-mqtt-password"


@dataclass
class Broker:
    """Mosquitto on a free port with one user; ``kill`` is a kill -9, ``start`` brings it back."""

    data_dir: Path
    port: int = field(default_factory=servers.free_port)
    proc: subprocess.Popen[bytes] | None = None
    tls: tuple[Path, Path] | None = None  # its certificate and key: TLS only

    def start(self) -> Broker:
        spec = servers.mosquitto_server(self.data_dir, self.port, USER, PASSWORD, tls=self.tls)
        self.proc = spec.start(timeout=30, die_with_parent=True)
        return self

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            servers.stop_process_group(self.proc.pid)
            self.proc = None


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    at: float

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class Subscriber:
    """A persistent-session client (QoS 1) subscribed to ``topics``, reconnecting while the broker is
    away; ``messages`` is everything it received, in order."""

    port: int
    topics: tuple[str, ...] = ("#",)
    identifier: str = "test-subscriber"
    tls: ssl.SSLContext | None = None
    messages: list[Received] = field(default_factory=list)
    connects: int = 0

    def latest(self, topic: str) -> bytes | None:
        for message in reversed(self.messages):
            if message.topic == topic:
                return message.payload
        return None

    def on(self, prefix: str) -> list[Received]:
        return [m for m in self.messages if m.topic.startswith(prefix)]

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                async with aiomqtt.Client(
                    "127.0.0.1", self.port, username=USER, password=PASSWORD, identifier=self.identifier,
                    clean_session=False, keepalive=5, timeout=5, tls_context=self.tls,
                ) as client:  # fmt: skip
                    self.connects += 1
                    for topic in self.topics:
                        await client.subscribe(topic, qos=1)
                    async for message in client.messages:
                        payload = (
                            message.payload
                            if isinstance(message.payload, bytes)
                            else str(message.payload).encode()
                        )
                        self.messages.append(
                            Received(str(message.topic), payload, message.retain, time.monotonic())
                        )
                        if stop.is_set():
                            return
            except aiomqtt.MqttError:
                await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def subscribed(
    port: int, *topics: str, identifier: str = "test-subscriber", tls: ssl.SSLContext | None = None
) -> AsyncIterator[Subscriber]:
    """A running ``Subscriber``, connected (and subscribed) before the body runs."""
    subscriber = Subscriber(port, topics or ("#",), identifier, tls=tls)
    stop = asyncio.Event()
    task = asyncio.create_task(subscriber.run(stop), name="mqtt-subscriber")
    deadline = time.monotonic() + 15
    while subscriber.connects == 0:
        assert time.monotonic() < deadline, "the test's MQTT client never connected"
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)  # its subscriptions acknowledged
    try:
        yield subscriber
    finally:
        stop.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate it signed for 127.0.0.1 and localhost: the (ca, cert, key) files."""
    now = datetime.datetime.now(datetime.UTC)
    folder.mkdir(parents=True, exist_ok=True)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def signed(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder().subject_name(name(subject)).issuer_name(issuer)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        )  # fmt: skip

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        signed("lookout test CA", ca_key, name("lookout test CA"))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    where = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        signed("127.0.0.1", key, ca.subject)
        .add_extension(x509.SubjectAlternativeName(where), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    private = serialization.PrivateFormat.PKCS8
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, private, serialization.NoEncryption()))
    paths[2].chmod(0o600)
    return paths


def sink_process(settings: Settings, log_path: Path) -> subprocess.Popen[bytes]:
    """``lookout-mqtt`` as a process with ``settings``, its log appended to ``log_path``."""
    env = {**os.environ, **settings_env(settings), "LOOKOUT_LOG_LEVEL": "INFO"}
    with open(log_path, "ab") as log:
        return subprocess.Popen([str(Path(sys.executable).parent / "lookout-mqtt")], env=env, stderr=log)

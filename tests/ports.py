"""Free ports for the throw-away servers of the tests and benchmarks."""

from __future__ import annotations

import random
import socket

from deploy.servers import SEAWEED_GRPC_OFFSET, SEAWEED_PORTS, ServerError, free_port

__all__ = ["free_port", "free_s3_port"]


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_s3_port() -> int:
    """An S3 port for ``s3_server`` whose whole block (the four ports after it, each +10000) is free.

    Drawn below the kernel's ephemeral range, so ``free_port`` never hands out one of them later.
    """
    for _ in range(200):
        base = random.randrange(20000, 22000 - len(SEAWEED_PORTS))
        block = [base + i for i in range(len(SEAWEED_PORTS))]
        if all(_bindable(p) and _bindable(p + SEAWEED_GRPC_OFFSET) for p in block):
            return base
    raise ServerError("no free block of ports for the S3 server")

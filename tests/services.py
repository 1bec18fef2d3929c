"""Make sure the real Redis and PostgreSQL the tests use are running; start them if not."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import time

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
PG_HOST, PG_PORT = "127.0.0.1", 5432

REDIS_START = [
    "redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379",
    "--save", "", "--appendonly", "no", "--dir", "/var/lib/redis",
    "--logfile", "/var/log/redis/ci.log",
]  # fmt: skip


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def wait_port(host: str, port: int, timeout_s: float) -> bool:
    """Wait until host:port accepts connections."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if port_open(host, port):
            return True
        time.sleep(0.1)
    return False


def ensure_redis() -> None:
    """Start the local redis-server if nothing answers on 6379."""
    if port_open(REDIS_HOST, REDIS_PORT):
        return
    if shutil.which("redis-server") is None:
        raise RuntimeError(
            "Redis is not running on 127.0.0.1:6379 and redis-server is not installed"
        )
    subprocess.run(REDIS_START, check=True, capture_output=True)
    if not wait_port(REDIS_HOST, REDIS_PORT, 10):
        raise RuntimeError("started redis-server but it does not answer on 127.0.0.1:6379")


def ensure_postgres() -> bool:
    """Start the local PostgreSQL cluster if needed; False when there is none on this machine."""
    if port_open(PG_HOST, PG_PORT):
        return True
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    if not versions or not glob.glob("/usr/bin/pg_ctlcluster"):
        return False
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "start"],
        check=False,
        capture_output=True,
    )
    return wait_port(PG_HOST, PG_PORT, 30)


if __name__ == "__main__":
    ensure_redis()
    print("redis: up")
    print("postgres:", "up" if ensure_postgres() else "not available")

"""Real redis-server processes owned by the tests, and what the tests ask of a server.

The tests never use a Redis that was already running (not the one on 6379): each server here is
started on a free loopback port and stopped by pid."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Any

import pytest
import redis

INSTALL_HINT = (
    "redis-server was not found on PATH. The integration tests start their own server: "
    "install it (Debian/Ubuntu: `apt-get install -y redis-server`; macOS: `brew install redis`) "
    "or set TIERCACHE_REDIS_SERVER=/path/to/redis-server."
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A redis-server process owned by the tests: started on a free loopback port, stopped by pid."""

    def __init__(self, port: int | None = None, extra: list[str] | None = None) -> None:
        binary = os.environ.get("TIERCACHE_REDIS_SERVER") or shutil.which("redis-server")
        if not binary:
            pytest.fail(INSTALL_HINT, pytrace=False)
        self.binary = binary
        self.port = port or free_port()
        self.extra = extra or []
        self.dir = tempfile.mkdtemp(prefix="tiercache-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
                "--protected-mode",
                "no",
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"redis-server exited at start: {err}")
            try:
                if redis.Redis(port=self.port, socket_timeout=0.5).ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING within 10 s")

    def client(self, **kwargs: Any) -> redis.Redis:
        return redis.Redis(port=self.port, **kwargs)

    def kill(self) -> None:
        """SIGKILL the server (a crash: no goodbye to clients)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def restart(self) -> None:
        self.kill()
        self.start()


def ready(cache: Any) -> Any:
    """``cache`` once its invalidation subscriber is subscribed (L1 is off until then), so that
    what a test expects of L1 does not depend on how fast that thread started."""
    assert cache.ready(10), "the cache's invalidation subscriber did not subscribe within 10 s"
    return cache


def other_clients(raw: redis.Redis) -> list[dict[str, Any]]:
    """CLIENT LIST of the server ``raw`` is connected to, without ``raw``'s own connection."""
    me = raw.client_id()
    return [c for c in raw.client_list() if int(c["id"]) != me]


def named_clients(raw: redis.Redis, name: str, *, subscribers: bool = True) -> int:
    """How many connections the server has with CLIENT SETNAME ``name`` (e.g. from ``?client_name=``);
    ``subscribers=False`` leaves out those subscribed to a channel (the invalidation subscriber)."""
    return sum(1 for c in raw.client_list() if c.get("name") == name and (subscribers or str(c.get("sub", "0")) == "0"))


def named_url(url: str, name: str) -> str:
    """``url`` whose connections name themselves ``name``, to be counted with :func:`named_clients`."""
    return f"{url}{'&' if '?' in url else '?'}client_name={name}"

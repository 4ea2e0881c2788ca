"""Helpers shared by the integration tests (imported as a plain module: this directory is on sys.path)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import redis


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.02, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy (returned), or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            pytest.fail(f"{what} not reached within {timeout} s (last value: {result!r})")
        time.sleep(interval)


def other_clients(raw: redis.Redis) -> list[dict[str, Any]]:
    """CLIENT LIST of the server ``raw`` is connected to, without ``raw``'s own connection."""
    me = raw.client_id()
    return [c for c in raw.client_list() if int(c["id"]) != me]


def start_again(server: Any) -> None:
    """``server.start()`` on the same port after a kill, first closing the dead process's stderr
    pipe (``RedisServer.start`` replaces ``proc`` without closing it: a ResourceWarning later)."""
    proc = server.proc
    if proc is not None and proc.poll() is not None and proc.stderr is not None:
        proc.stderr.close()
    server.start()

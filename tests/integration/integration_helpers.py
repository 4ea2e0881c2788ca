"""Helpers shared by the integration tests (imported as a plain module: this directory is on sys.path)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import redis


def ready(cache: Any) -> Any:
    """``cache`` once its invalidation subscriber is subscribed (L1 is off until then), so that
    what a test expects of L1 does not depend on how fast that thread started."""
    assert cache.ready(10), "the cache's invalidation subscriber did not subscribe within 10 s"
    return cache


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


def named_clients(raw: redis.Redis, name: str, *, subscribers: bool = True) -> int:
    """How many connections the server has with CLIENT SETNAME ``name`` (e.g. from ``?client_name=``);
    ``subscribers=False`` leaves out those subscribed to a channel (the invalidation subscriber)."""
    return sum(1 for c in raw.client_list() if c.get("name") == name and (subscribers or str(c.get("sub", "0")) == "0"))


def named_url(url: str, name: str) -> str:
    """``url`` whose connections name themselves ``name``, to be counted with :func:`named_clients`."""
    return f"{url}{'&' if '?' in url else '?'}client_name={name}"

"""cache.clear(): a new generation of keys everywhere, stale copies included; tag versions stay
in L1 while their entries are used."""

from __future__ import annotations

from typing import Any

import fakeredis
import pytest

from tests.support import Clock
from tiercache import TieredCache, tiered


def test_clear_changes_every_key_and_drops_stale_copies() -> None:
    clock = Clock(0.0, frozen=True)
    cache = TieredCache(namespace="clr", clock=clock)
    outcomes: list[Any] = ["v1"]

    @tiered(cache, ttl=10, stale_ttl=100)
    def f(x: int) -> str:
        out = outcomes.pop(0)
        if isinstance(out, Exception):
            raise out
        return str(out)

    before = f.key(1)
    assert f(1) == "v1"
    cache.set("u", 1)
    cache.clear()
    assert f.key(1) != before and f.key(1).startswith("tc:clr:v1:g")
    assert cache.key("u").startswith("tc:clr:v1:g")
    assert cache.get("u") is None
    clock.advance(11)  # past the TTL, within stale_ttl: only a stale copy could answer now
    outcomes.append(RuntimeError("down"))
    with pytest.raises(RuntimeError):
        f(1)  # the old copy is invalidated, not merely old: never served (its key is gone too)
    assert cache.stats().stale_served == 0


def test_tag_versions_stay_in_l1_while_their_entries_are_used() -> None:
    server = fakeredis.FakeServer()
    cache = TieredCache(client=fakeredis.FakeRedis(server=server), namespace="lru", l1_maxsize=3)
    assert cache.ready(5)
    calls: list[int] = []

    @tiered(cache, tags=["t"])
    def f(x: int) -> int:
        calls.append(x)
        return x

    f(0)  # L1: the version of "t" (read first), then f(0)
    f(1)  # full: version, f(0), f(1)
    f(2)  # evicts the least recently used: f(0), not the version every call has just used
    version = "tc:lru:tag:{t}"
    assert cache._core.local.entry(version) is not None, "the tag's version was evicted before its entries"
    assert cache._core.local.entry(f.key(0)) is None
    assert calls == [0, 1, 2]
    cache.close()

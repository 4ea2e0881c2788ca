"""L1: LRU order, entry and byte bounds, per-entry TTL on an injected clock."""

from __future__ import annotations

import pytest

from tests.support import Clock
from tiercache import MISSING
from tiercache._local import LocalCache


@pytest.fixture
def clock() -> Clock:
    return Clock(1000.0, frozen=True)


def keys_of(local: LocalCache) -> list[str]:
    return list(local._data)


def test_get_put_and_missing(clock: Clock) -> None:
    local = LocalCache(10, None, clock)
    assert local.get("a") is MISSING
    local.put("a", None, 5, 1)
    assert local.get("a") is None
    local.put("b", [1], 5, 1)
    assert local.get("b") == [1]
    assert len(local) == 2


def test_lru_evicts_least_recently_used(clock: Clock) -> None:
    local = LocalCache(3, None, clock)
    for k in "abc":
        local.put(k, k, 60, 1)
    assert local.get("a") == "a"  # a is now the most recent
    local.put("d", "d", 60, 1)
    assert local.get("b") is MISSING
    assert keys_of(local) == ["c", "a", "d"]
    local.put("c", "c2", 60, 1)  # overwriting makes c most recent
    local.put("e", "e", 60, 1)
    assert keys_of(local) == ["d", "c", "e"]
    assert local.get("a") is MISSING
    assert local.get("c") == "c2"
    assert len(local) == 3


def test_maxsize_zero_stores_nothing(clock: Clock) -> None:
    local = LocalCache(0, None, clock)
    local.put("a", 1, 60, 1)
    assert local.get("a") is MISSING
    assert len(local) == 0
    assert local.bytes == 0


def test_maxbytes_eviction_and_accounting(clock: Clock) -> None:
    local = LocalCache(100, 100, clock)
    local.put("a", "a", 60, 40)
    local.put("b", "b", 60, 40)
    assert local.bytes == 80
    local.put("c", "c", 60, 30)  # 110 > 100: a goes
    assert keys_of(local) == ["b", "c"]
    assert local.bytes == 70
    local.put("b", "b2", 60, 10)  # replacing adjusts the count
    assert local.bytes == 40
    assert keys_of(local) == ["c", "b"]
    local.put("d", "d", 60, 100)  # exactly maxbytes: everything else goes
    assert keys_of(local) == ["d"]
    assert local.bytes == 100


def test_value_larger_than_maxbytes_is_not_stored_and_drops_old_copy(clock: Clock) -> None:
    local = LocalCache(100, 100, clock)
    local.put("a", "old", 60, 10)
    local.put("b", "b", 60, 10)
    local.put("a", "huge", 60, 101)
    assert local.get("a") is MISSING  # never the stale "old"
    assert local.get("b") == "b"  # and nothing else evicted for it
    assert local.bytes == 10


def test_ttl_per_entry(clock: Clock) -> None:
    local = LocalCache(10, None, clock)
    local.put("short", 1, 1.0, 3)
    local.put("long", 2, 10.0, 5)
    assert local.ttl_left("short") == pytest.approx(1.0)
    assert local.ttl_left("long") == pytest.approx(10.0)
    assert local.ttl_left("none") is None
    clock.advance(0.999)
    assert local.get("short") == 1
    clock.advance(0.001)
    assert local.get("short") is MISSING  # expires at exactly put time + ttl
    assert local.get("long") == 2
    assert local.bytes == 5  # the expired entry's bytes are released
    assert len(local) == 1
    clock.advance(20)
    assert local.get("long") is MISSING
    assert local.bytes == 0
    assert len(local) == 0


@pytest.mark.parametrize("ttl", [0, -1, -0.0])
def test_non_positive_ttl_is_not_stored_and_drops_old_copy(clock: Clock, ttl: float) -> None:
    local = LocalCache(10, None, clock)
    local.put("a", "old", 60, 7)
    local.put("a", "new", ttl, 7)
    assert local.get("a") is MISSING
    assert local.bytes == 0


def test_expired_entries_do_not_refresh_on_get(clock: Clock) -> None:
    local = LocalCache(10, None, clock)
    local.put("a", 1, 5, 1)
    clock.advance(4)
    assert local.get("a") == 1
    clock.advance(1)
    assert local.get("a") is MISSING


def test_pop_and_clear(clock: Clock) -> None:
    local = LocalCache(10, 1000, clock)
    for i, k in enumerate("abcde"):
        local.put(k, k, 60, i + 1)
    assert local.bytes == 15
    local.pop("a")
    local.pop("zz")  # absent: no error
    assert local.get("a") is MISSING
    assert local.bytes == 14
    local.pop("b")
    local.pop("c")
    assert keys_of(local) == ["d", "e"]
    assert local.bytes == 9
    local.clear()
    assert len(local) == 0
    assert local.bytes == 0
    assert local.get("d") is MISSING


def test_byte_count_matches_entries_after_mixed_operations(clock: Clock) -> None:
    local = LocalCache(5, 50, clock)
    for i in range(200):
        k = f"k{i % 13}"
        if i % 7 == 0:
            local.pop(k)
        elif i % 11 == 0:
            local.put(k, i, 0, 3)
        else:
            local.put(k, i, 1 + i % 3, i % 17)
        if i % 5 == 0:
            clock.advance(1)
            local.get(f"k{i % 13}")
        assert local.bytes == sum(entry[2] for entry in local._data.values())
        assert len(local) <= 5
        assert local.bytes <= 50

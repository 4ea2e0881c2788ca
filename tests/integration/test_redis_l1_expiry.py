"""Invariant: an L1 copy never outlives its L2 copy.

Measured exactly rather than with sleeps: the cache runs on ``clock=time.time`` (the clock
Redis keeps expiry times in), so the L1 entry's absolute expiry can be compared with the
absolute expiry Redis holds (``PEXPIRETIME``, in ms). The comparison is sound, so a correct
cache always passes:

* ``t0 + ttl_left(key)``, with ``t0`` read just before ``ttl_left``, is at most the L1 expiry;
* Redis serves a key while its (floored) millisecond clock is ``<= PEXPIRETIME``, so the Redis
  copy lives until ``(PEXPIRETIME + 1) / 1000`` s.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.support import eventually
from tiercache import tiered

pytestmark = pytest.mark.redis


def l1_outlives_l2_by(cache: Any, raw: Any, key: str) -> float:
    """Seconds by which the L1 entry of ``key`` provably outlives its Redis entry (<= 0: it does not)."""
    t0 = time.time()
    left = cache._core.local.ttl_left(key)
    assert left is not None, f"{key} is not in L1"
    ms = raw.pexpiretime(key)
    assert ms > 0, f"{key} has no expiry in Redis (PEXPIRETIME {ms})"
    return (t0 + left) - (ms + 1) / 1000.0


def assert_never_outlives(excess: list[float], what: str) -> None:
    bad = [e for e in excess if e > 0]
    assert not bad, (
        f"{what}: the L1 copy outlived the Redis copy in {len(bad)} of {len(excess)} entries, "
        f"by up to {max(bad) * 1000:.3f} ms"
    )


def test_l1_copy_of_an_l2_hit_never_outlives_redis(mode: Any, make_cache: Any, raw: Any) -> None:
    cache = make_cache(clock=time.time, l1_ttl=60)
    calls: list[int] = []
    f = tiered(cache, name="short")(mode.fn(lambda x: calls.append(x) or x))

    # A small value, read right after planting it with a short PX: L1 gets at most what Redis has left.
    key = f.key(0)
    raw.set(key, cache._core.codec.encode(key, "planted"), px=1500)
    pttl_before = raw.pttl(key)
    assert mode.call(f, 0) == "planted"
    left = cache._core.local.ttl_left(key)
    assert left is not None, "an L2 hit was not kept in L1"
    assert left <= pttl_before / 1000.0 + 0.001, f"L1 keeps it {left:.3f} s, Redis had {pttl_before} ms left"

    # A large value takes a while to decode: the TTL Redis reported is older by then.
    big = [{"i": i, "s": f"x{i}"} for i in range(50_000)]
    key = f.key(1)
    raw.set(key, cache._core.codec.encode(key, big), px=5000)
    assert mode.call(f, 1) == big
    excess = [l1_outlives_l2_by(cache, raw, key)]

    # Many small ones: sub-millisecond latencies, checked often enough to be seen.
    for i in range(2, 200):
        key = f.key(i)
        raw.set(key, cache._core.codec.encode(key, i), px=3000)
        assert mode.call(f, i) == i
        excess.append(l1_outlives_l2_by(cache, raw, key))
    assert calls == []
    assert_never_outlives(excess, "L2 hit")


def test_l1_copy_of_a_user_key_l2_hit_never_outlives_redis(mode: Any, make_cache: Any, raw: Any) -> None:
    cache = make_cache(clock=time.time, l1_ttl=60)
    big = {"rows": [[i, f"r{i}"] for i in range(60_000)]}
    key = cache.key("big")
    raw.set(key, cache._core.codec.encode(key, big), px=5000)
    assert mode.run(mode.api(cache).get("big")) == big
    excess = [l1_outlives_l2_by(cache, raw, key)]
    for i in range(200):
        key = cache.key(f"u{i}")
        raw.set(key, cache._core.codec.encode(key, [i]), px=2000)
        assert mode.run(mode.api(cache).get(f"u{i}")) == [i]
        excess.append(l1_outlives_l2_by(cache, raw, key))
    assert_never_outlives(excess, "get() L2 hit")


def test_l1_copy_of_a_fill_never_outlives_redis(mode: Any, make_cache: Any, raw: Any) -> None:
    cache = make_cache(clock=time.time, l1_ttl=60)
    f = tiered(cache, name="fill", ttl=2)(mode.fn(lambda x: [x]))
    excess = []
    for i in range(200):
        assert mode.call(f, i) == [i]
        excess.append(l1_outlives_l2_by(cache, raw, f.key(i)))
    assert_never_outlives(excess, "fill after a miss")


def test_l1_copy_of_a_write_never_outlives_redis(mode: Any, make_cache: Any, raw: Any) -> None:
    cache = make_cache(clock=time.time, l1_ttl=60)
    api = mode.api(cache)
    f = tiered(cache, name="refreshed", ttl=2)(mode.fn(lambda x: x * 3))
    excess = []
    for i in range(100):
        mode.run(api.set(f"w{i}", {"v": i}, ttl=2))
        excess.append(l1_outlives_l2_by(cache, raw, cache.key(f"w{i}")))
        assert mode.call(f.refresh, i) == i * 3
        excess.append(l1_outlives_l2_by(cache, raw, f.key(i)))
    assert_never_outlives(excess, "set() and refresh()")


def test_l1_entry_is_gone_once_redis_expired_it(mode: Any, make_cache: Any, raw: Any) -> None:
    """Coarse version with real waiting: a 300 ms PX entry read into L1 is recomputed once expired."""
    cache = make_cache(l1_ttl=60)
    calls: list[int] = []
    f = tiered(cache, name="expiring")(mode.fn(lambda x: calls.append(x) or "computed"))
    key = f.key(1)
    raw.set(key, cache._core.codec.encode(key, "planted"), px=300)
    assert mode.call(f, 1) == "planted"
    assert mode.call(f, 1) == "planted"  # from L1
    assert cache.stats().l1_hits == 1
    eventually(lambda: not raw.exists(key), "Redis to expire the key", interval=0.01)
    time.sleep(0.005)
    assert mode.call(f, 1) == "computed", "L1 served a value Redis had already expired"
    assert calls == [1]


class PreemptedClock:
    """``time.time``, but every read first lets ``step`` seconds pass, as if the thread were
    preempted right before each clock read (what a busy process does at random). An L1 expiry
    fixed when the request was sent does not move; one recomputed from a later read does."""

    def __init__(self, step: float) -> None:
        self.step = step
        self.enabled = True

    def __call__(self) -> float:
        if self.enabled:
            time.sleep(self.step)
        return time.time()


@pytest.mark.parametrize("path", ["l2_hit", "fill", "set", "refresh"])
def test_l1_expiry_does_not_drift_with_time_between_clock_reads(
    mode: Any, make_cache: Any, raw: Any, path: str
) -> None:
    clock = PreemptedClock(0.003)
    cache = make_cache(clock=clock, l1_ttl=60)
    f = tiered(cache, name="drift", ttl=3)(mode.fn(lambda x: [x]))
    excess = []
    for i in range(8):
        if path == "l2_hit":
            key = f.key(i)
            raw.set(key, cache._core.codec.encode(key, [i]), px=3000)
            assert mode.call(f, i) == [i]
        elif path == "fill":
            key = f.key(i)
            assert mode.call(f, i) == [i]
        elif path == "set":
            key = cache.key(f"d{i}")
            mode.run(mode.api(cache).set(f"d{i}", [i], ttl=3))
        else:
            key = f.key(i)
            assert mode.call(f.refresh, i) == [i]
        clock.enabled = False  # measure with a plain clock
        excess.append(l1_outlives_l2_by(cache, raw, key))
        clock.enabled = True
    assert_never_outlives(excess, f"{path} with 3 ms between clock reads")

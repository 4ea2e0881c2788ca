"""tiercache.testing: MemoryRedis stands in for Redis, and each fault it injects makes real
caches do what the same fault on a real Redis makes them do (sync and async alike)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.support import Clock, Mode, eventually
from tiercache import ConfigError, TieredCache, tiered
from tiercache.testing import MemoryRedis

QUIET = {"staleness_bound": 30.0}  # no health-check PING gets in the way of held messages


@pytest.fixture
def memory(mode: Mode) -> Iterator[MemoryRedis]:
    backend = MemoryRedis()
    yield backend
    if mode.is_async:
        mode.run(backend.aclose())
    else:
        backend.close()


def test_caches_share_redis_and_stay_coherent(mode: Mode, memory: MemoryRedis) -> None:
    a, b = memory.cache(namespace="app", **QUIET), memory.cache(namespace="app", **QUIET)
    mode.run(mode.api(a).set("k", 1, wait=True))  # applied everywhere before b reads
    assert mode.run(mode.api(b).get("k")) == 1  # from the shared L2
    assert mode.run(mode.api(b).get("k")) == 1 and b.stats().l1_hits == 1
    result = mode.run(mode.api(a).set("k", 2, wait=True))
    assert result.complete and result.receivers == 2
    assert mode.run(mode.api(b).get("k")) == 2  # b's copy was invalidated over the bus
    assert memory.redis.exists(a.key("k")) == 1  # the fault-free client sees the same server


def test_a_dropped_invalidation_is_noticed_as_a_sequence_gap(mode: Mode, memory: MemoryRedis) -> None:
    a, b = memory.cache(namespace="app", **QUIET), memory.cache(namespace="app", **QUIET)
    mode.run(mode.api(a).set("k", "old", wait=True))
    assert mode.run(mode.api(b).get("k")) == "old"  # now in b's L1
    memory.drop_messages(1, to=b)
    mode.run(mode.api(a).set("k", "new"))
    assert mode.run(mode.api(b).get("k")) == "old"  # the invalidation never arrived: stale
    assert b.stats().bus_gaps == 0
    # The next message shows the gap; wait=True returns once b applied it (and flushed).
    assert mode.run(mode.api(a).set("other", 1, wait=True)).complete
    assert b.stats().bus_gaps == 1
    assert mode.run(mode.api(b).get("k")) == "new"


def test_drop_all_until_restored_counts_publishes(mode: Mode, memory: MemoryRedis) -> None:
    a, b = memory.cache(namespace="app", **QUIET), memory.cache(namespace="app", **QUIET)
    mode.run(mode.api(b).set("k", 0, wait=True))
    memory.drop_messages()  # every message, for every cache
    result = mode.run(mode.api(a).set("k", 1, wait=True, timeout=0.05))
    assert (result.receivers, result.acknowledged) == (2, 0)  # Redis delivered it; nobody got it
    assert mode.run(mode.api(b).get("k")) == 0  # stale
    memory.restore_messages()
    assert mode.run(mode.api(a).set("k", 2, wait=True)).complete
    assert mode.run(mode.api(b).get("k")) == 2
    assert b.stats().bus_gaps == 1


@pytest.mark.parametrize("outage_l1_ttl", [5.0, 0.0])
def test_down_fails_open_with_outage_l1_ttl(mode: Mode, memory: MemoryRedis, outage_l1_ttl: float) -> None:
    clock = Clock()
    cache = memory.cache(namespace="app", clock=clock, outage_l1_ttl=outage_l1_ttl)
    calls: list[int] = []

    def body(x: int) -> int:
        calls.append(x)
        return x * 10

    f = tiered(cache)(mode.fn(body))
    memory.down()  # returns once the subscriber noticed
    assert cache.stats().bus_connected is False
    assert mode.run(f(1)) == 10 and len(calls) == 1  # fail open: the function answers
    assert cache.stats().backend_errors >= 1
    assert mode.run(f(1)) == 10
    assert len(calls) == (1 if outage_l1_ttl else 2)  # kept in L1 for outage_l1_ttl, or not at all
    clock.advance(outage_l1_ttl + 1)
    assert mode.run(f(1)) == 10
    assert len(calls) == (2 if outage_l1_ttl else 3)  # the outage entry expired
    assert mode.run(mode.api(cache).get("k", "default")) == "default"
    memory.up()  # returns once resubscribed
    assert cache.stats().bus_connected is True
    clock.advance(2)  # past the circuit breaker's cooldown
    mode.run(mode.api(cache).set("k", "back"))
    assert memory.redis.exists(cache.key("k")) == 1


@pytest.mark.parametrize("silent", [False, True])
def test_outage_context_manager(mode: Mode, memory: MemoryRedis, silent: bool) -> None:
    cache = memory.cache(namespace="app", staleness_bound=0.2, socket_timeout=0.05, connect_timeout=0.05)
    with memory.outage(silent=silent):  # a silent one is noticed by the health check
        assert cache.stats().bus_connected is False
        assert mode.run(mode.api(cache).set("k", 1)).seq is None  # the write failed open
    assert cache.stats().bus_connected is True
    assert mode.run(mode.api(cache).set("k", 1)).seq is not None


def test_partition_cuts_one_node_and_heal_resubscribes(mode: Mode, memory: MemoryRedis) -> None:
    a, b = memory.cache(namespace="app", **QUIET), memory.cache(namespace="app", **QUIET)
    mode.run(mode.api(a).set("k", "v1", wait=True))
    assert mode.run(mode.api(b).get("k")) == "v1"
    flushes = b.stats().bus_flushes
    memory.partition(b)
    assert (a.stats().bus_connected, b.stats().bus_connected) == (True, False)
    assert b.stats().bus_flushes == flushes + 1  # b lost its bus: L1 flushed
    errors = b.stats().backend_errors
    assert mode.run(mode.api(b).get("k")) is None  # b fails open: Redis is unreachable from it
    assert b.stats().backend_errors == errors + 1
    result = mode.run(mode.api(a).set("k", "v2"))  # a is fine
    assert result.seq is not None and result.receivers == 1  # only a's own subscriber is there
    assert mode.run(mode.api(a).get("k")) == "v2"
    memory.heal(b)  # returns once b is subscribed again
    assert b.stats().bus_connected is True
    assert mode.run(mode.api(b).get("k")) == "v2"
    assert mode.run(mode.api(a).set("k", "v3", wait=True)).receivers == 2  # coherent again
    assert mode.run(mode.api(b).get("k")) == "v3"


def test_a_silent_partition_times_out_and_fails_the_health_check(mode: Mode, memory: MemoryRedis) -> None:
    """A black hole (no reset): commands time out after socket_timeout, and the subscriber's
    unanswered PING gives the link up within staleness_bound, as with a real dropped route."""
    a = memory.cache(namespace="app", **QUIET)
    b = memory.cache(namespace="app", staleness_bound=0.2, socket_timeout=0.05, connect_timeout=0.05)
    mode.run(mode.api(a).set("k", "old", wait=True))
    assert mode.run(mode.api(b).get("k")) == "old"
    memory.partition(b, silent=True)  # returns once b's health check gave the link up
    assert (a.stats().bus_connected, b.stats().bus_connected) == (True, False)
    errors = b.stats().backend_errors
    assert mode.run(mode.api(b).get("k")) is None  # L1 flushed; the read timed out: fail open
    assert b.stats().backend_errors == errors + 1
    mode.run(mode.api(a).set("k", "new"))
    memory.heal(b)  # returns once b is subscribed again
    assert mode.run(mode.api(b).get("k")) == "new"
    assert mode.run(mode.api(a).set("k", "newer", wait=True)).complete


def test_held_messages_leave_a_node_stale_until_restored(mode: Mode, memory: MemoryRedis) -> None:
    a, b = memory.cache(namespace="app", **QUIET), memory.cache(namespace="app", **QUIET)
    mode.run(mode.api(a).set("k", "old", wait=True))
    assert mode.run(mode.api(b).get("k")) == "old"
    memory.hold_messages(to=b)
    mode.run(mode.api(a).set("k", "new"))
    assert mode.run(mode.api(a).get("k")) == "new"  # a is not held
    assert mode.run(mode.api(b).get("k")) == "old"  # stale until delivered
    memory.restore_messages()
    eventually(lambda: b.get("k") == "new", "the held invalidation to reach b")
    assert mode.run(mode.api(b).get("k")) == "new"
    assert b.stats().bus_gaps == 0  # nothing was lost, only late


def test_delayed_messages_arrive_late_and_in_order(mode: Mode, memory: MemoryRedis) -> None:
    a, b = memory.cache(namespace="app", **QUIET), memory.cache(namespace="app", **QUIET)
    mode.run(mode.api(a).set("k", 0, wait=True))
    assert mode.run(mode.api(b).get("k")) == 0
    memory.delay_messages(2.0, to=b)
    for i in (1, 2, 3):
        mode.run(mode.api(a).set("k", i))
    assert mode.run(mode.api(b).get("k")) == 0  # stale until delivered
    eventually(lambda: b.get("k") == 3, "the delayed invalidations to reach b")
    assert mode.run(mode.api(b).get("k")) == 3
    assert b.stats().bus_gaps == 0  # late, in order, none lost


def test_a_held_link_fails_the_health_check(mode: Mode, memory: MemoryRedis) -> None:
    """Held long enough, a link looks half-open: the PING goes unanswered, the subscriber gives
    the connection up and L1 is flushed within staleness_bound, as with a real stalled Redis."""
    a, b = memory.cache(namespace="app", **QUIET), memory.cache(namespace="app", staleness_bound=0.2)
    mode.run(mode.api(a).set("k", "old", wait=True))
    assert mode.run(mode.api(b).get("k")) == "old"
    memory.hold_messages(to=b)
    mode.run(mode.api(a).set("k", "new"))
    eventually(lambda: b.stats().bus_connected is False, "b's health check to give the link up")
    assert mode.run(mode.api(b).get("k")) == "new"  # L1 flushed: read from Redis
    memory.restore_messages()
    eventually(lambda: b.ready(0), "b to resubscribe")


def test_bad_arguments_say_what_to_do(memory: MemoryRedis) -> None:
    with pytest.raises(ConfigError, match="client"):
        memory.cache(client=object())
    stranger = TieredCache(namespace="app")
    try:
        with pytest.raises(ConfigError, match="not made by this MemoryRedis"):
            memory.partition(stranger)
    finally:
        stranger.close()
    with pytest.raises(ConfigError, match="drop_messages"):
        memory.drop_messages(-1)
    with pytest.raises(ConfigError, match="delay_messages"):
        memory.delay_messages(float("inf"))


def test_public_surface() -> None:
    import tiercache.testing

    assert tiercache.testing.__all__ == ["MemoryRedis"]
    assert MemoryRedis.__module__ == "tiercache.testing"


def test_missing_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "tiercache.testing")
    monkeypatch.setitem(sys.modules, "fakeredis", None)  # as if not installed
    with pytest.raises(ImportError, match=r"tiercache\[testing\]"):
        importlib.import_module("tiercache.testing")


def test_importing_tiercache_does_not_import_fakeredis() -> None:
    code = "import sys, tiercache; assert 'fakeredis' not in sys.modules and 'tiercache.testing' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

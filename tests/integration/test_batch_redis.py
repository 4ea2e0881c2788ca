"""``@tiered_batch`` on a real redis-server: the round trips a batch costs (counted at the
driver and with ``INFO commandstats``), what other caches and processes read of it. (Leases
given back on failure, numpy arrays through Redis and ``max_value_bytes``, on fakeredis and
real Redis: test_batch_backends.py.)

(Named ``..._redis.py``: ``tests/unit/test_batch.py`` already takes the basename, and the test
directories are not packages.)"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support import RedisServer, eventually, ready
from tiercache import TieredCache, tiered_batch
from tiercache._sync import SyncRedis

pytestmark = pytest.mark.redis

ROOT = Path(__file__).resolve().parents[2]
IGNORED = {"info", "ping"}


def command_calls(raw: redis.Redis) -> collections.Counter[str]:
    stats = raw.info("commandstats")
    return collections.Counter({name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()})


class Commands:
    """What the server ran since ``start()`` (INFO and PING aside; Lua's own commands included)."""

    def __init__(self, raw: redis.Redis) -> None:
        self.raw = raw
        self.before = command_calls(raw)

    def start(self) -> None:
        self.before = command_calls(self.raw)

    def delta(self) -> collections.Counter[str]:
        d = command_calls(self.raw) - self.before
        for name in IGNORED:
            d.pop(name, None)
        return d


class RoundTrips:
    """Counts the RedisOps each cache's sync driver sends (one op: one write, one read)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.by_cache: collections.Counter[int] = collections.Counter()
        original = SyncRedis.execute

        def execute(remote: SyncRedis, op: Any) -> Any:
            self.by_cache[id(remote)] += 1
            return original(remote, op)

        monkeypatch.setattr(SyncRedis, "execute", execute)

    def of(self, cache: TieredCache) -> int:
        return self.by_cache[id(cache._sync)]


class Embedder:
    def __init__(self, result: Callable[[Any], Any] = lambda item: f"v:{item}") -> None:
        self.__qualname__ = "Embedder"  # tiered_batch names the function by it, name= or not
        self.batches: list[list[Any]] = []
        self.result = result
        self.fail: BaseException | None = None

    def __call__(self, items: list[Any]) -> list[Any]:
        self.batches.append(list(items))
        if self.fail is not None:
            raise self.fail
        return [self.result(i) for i in items]


@pytest.fixture
def new_cache(redis_server: RedisServer, namespace: str) -> Iterator[Callable[..., TieredCache]]:
    made: list[TieredCache] = []

    def make(url: str | None = None, **kwargs: Any) -> TieredCache:
        kwargs.setdefault("namespace", namespace)
        cache = ready(TieredCache(url or redis_server.url, **kwargs))
        made.append(cache)
        return cache

    yield make
    for cache in made:
        cache.close()


def test_a_batch_costs_two_round_trips_with_misses_one_with_l2_hits_none_from_l1(
    own_redis: RedisServer, own_raw: redis.Redis, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    caches = [ready(TieredCache(own_redis.url, namespace=namespace)) for _ in range(3)]
    try:
        trips = RoundTrips(monkeypatch)
        embs = [Embedder() for _ in caches]
        fs = [tiered_batch(c, name="rt.embed")(e) for c, e in zip(caches, embs, strict=True)]
        fs[0](["warm-up"])  # the server learns the fill script (a NOSCRIPT reply, then EVAL)
        commands = Commands(own_raw)

        # misses: SET NX GET + PTTL per key in one pipeline, then one script for the fills
        n = trips.of(caches[0])
        commands.start()
        assert fs[0](["a", "b", "c", "a"]) == ["v:a", "v:b", "v:c", "v:a"]
        assert trips.of(caches[0]) - n == 2
        d = commands.delta()
        assert d["pttl"] == 3 and d["evalsha"] == 1 and d["eval"] == 0, d
        assert d["set"] == 3 + 3, d  # three top-level SET NX GET, three SETs inside the script

        # all from L1: nothing sent
        n = trips.of(caches[0])
        commands.start()
        assert fs[0](["c", "a"]) == ["v:c", "v:a"]
        assert trips.of(caches[0]) == n
        assert commands.delta() == collections.Counter()

        # another cache: all from Redis in one round trip
        commands.start()
        assert fs[1](["b", "a", "c"]) == ["v:b", "v:a", "v:c"]
        assert trips.of(caches[1]) == 1
        d = commands.delta()
        assert d["pttl"] == 3 and d["evalsha"] == 0, d
        assert caches[1].stats().l2_hits == 3 and embs[1].batches == []

        # a third: L2 hits and misses mixed: still two round trips, only the misses computed
        commands.start()
        assert fs[2](["a", "x", "b", "y"]) == ["v:a", "v:x", "v:b", "v:y"]
        assert trips.of(caches[2]) == 2
        assert commands.delta()["evalsha"] == 1
        assert embs[2].batches == [["x", "y"]]
        assert embs[0].batches == [["warm-up"], ["a", "b", "c"]]
        assert not [name for name in command_calls(own_raw) if name.split("|")[0] in {"keys", "scan"}]
    finally:
        for c in caches:
            c.close()


def test_async_batch_round_trips(own_redis: RedisServer, own_raw: redis.Redis, namespace: str) -> None:
    cache = ready(TieredCache(own_redis.url, namespace=namespace))
    other = ready(TieredCache(own_redis.url, namespace=namespace))

    async def scenario() -> None:
        calls: list[list[str]] = []

        async def embed(items: list[str]) -> list[str]:
            await asyncio.sleep(0)
            calls.append(list(items))
            return [f"v:{i}" for i in items]

        f = tiered_batch(cache, name="art.embed")(embed)
        g = tiered_batch(other, name="art.embed")(embed)
        await f(["warm-up"])
        commands = Commands(own_raw)
        assert await f(["a", "b"]) == ["v:a", "v:b"]
        d = commands.delta()
        assert d["pttl"] == 2 and d["evalsha"] == 1, d
        commands.start()
        assert await f(["b", "a"]) == ["v:b", "v:a"]
        assert commands.delta() == collections.Counter()
        assert await g(["a", "b", "c"]) == ["v:a", "v:b", "v:c"]
        assert calls == [["warm-up"], ["a", "b"], ["c"]]
        assert other.stats().l2_hits == 2
        await g.invalidate(["a"])
        await cache.aio.ready()
        eventually(lambda: f.keys(["a"])[0] not in cache._core.local._data, "the other cache's eviction", timeout=2)
        assert await f(["a", "b"]) == ["v:a", "v:b"]
        assert calls[-1] == ["a"]
        await cache.aclose()
        await other.aclose()

    try:
        asyncio.run(scenario())
    finally:
        cache.close()  # the subscriber threads and the sync pools
        other.close()


WORKER = """
import dataclasses, json, sys
from tiercache import TieredCache, tiered_batch
url, namespace, items = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
cache = TieredCache(url, namespace=namespace)
computed = []

@tiered_batch(cache, name="proc.embed")
def embed(items):
    computed.append(list(items))
    return ["other:" + i for i in items]

print(json.dumps({"values": embed(items), "computed": computed, "stats": dataclasses.asdict(cache.stats())}))
cache.close()
"""


def in_another_process(url: str, namespace: str, items: list[str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", WORKER, url, namespace, json.dumps(items)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return json.loads(done.stdout)  # type: ignore[no-any-return]


@pytest.mark.slow
def test_other_caches_and_processes_read_what_a_batch_stored(
    redis_server: RedisServer, namespace: str, new_cache: Callable[..., TieredCache]
) -> None:
    cache, other = new_cache(), new_cache()
    emb, emb_other = Embedder(), Embedder()
    f = tiered_batch(cache, name="proc.embed")(emb)
    g = tiered_batch(other, name="proc.embed")(emb_other)
    assert f(["a", "b", "c"]) == ["v:a", "v:b", "v:c"]
    assert g(["c", "a"]) == ["v:c", "v:a"]  # L2 hits, then in other's L1

    there = in_another_process(redis_server.url, namespace, ["b", "a", "d"])
    assert there["values"] == ["v:b", "v:a", "other:d"]
    assert there["computed"] == [["d"]]
    assert there["stats"]["l2_hits"] == 2

    result = f.invalidate(["a", "d"])
    assert result.receivers == 2

    def recomputed_there() -> list[list[Any]]:
        g(["a"])  # from other's L1 until the invalidation arrives, then computed
        return emb_other.batches

    eventually(recomputed_there, "the other cache dropping a", timeout=2)
    assert emb_other.batches == [["a"]]
    assert g(["c"]) == ["v:c"] and len(emb_other.batches) == 1
    there = in_another_process(redis_server.url, namespace, ["b", "a", "d"])
    assert there["values"] == ["v:b", "v:a", "other:d"]  # a: other's new value; d: computed again
    assert there["computed"] == [["d"]]

"""``@tiered_batch`` on L1-only caches and fakeredis: partial hits, duplicates, other
arguments in the keys, wrong result counts, numeric numpy arrays, sync and async. (Failures,
numpy through Redis and ``max_value_bytes``: tests/integration/test_batch_backends.py, on
fakeredis and real Redis.)"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from tests.support import Embedder, FakeRedisCaches, Joined
from tiercache import ConfigError, TieredCache, tiered_batch
from tiercache._remote import LEASE_PREFIX


class Fake(FakeRedisCaches):
    """Caches on one fakeredis server, and what they left in it."""

    def __init__(self, mode: Any) -> None:
        super().__init__(mode, "batch")

    def values(self) -> dict[bytes, bytes]:
        return {k: self.raw.get(k) for k in self.raw.keys(b"tc:batch:v1:*")}

    def markers(self) -> list[bytes]:
        return [k for k, v in self.values().items() if v is not None and v.startswith(LEASE_PREFIX)]


@pytest.fixture
def fake(mode: Any) -> Iterator[Fake]:
    f = Fake(mode)
    yield f
    f.close()


@pytest.fixture(params=["l1", "fakeredis"])
def cache(request: pytest.FixtureRequest, mode: Any, fake: Fake) -> TieredCache:
    """An L1-only cache, and a cache on fakeredis."""
    if request.param == "l1":
        return TieredCache(namespace="batch")
    return fake.cache()


def test_partial_hits_pass_only_the_missing_items_in_one_call_in_order(mode: Any, cache: TieredCache) -> None:
    emb = Embedder()
    f = tiered_batch(cache)(emb.function(mode))
    assert mode.call(f, ["a", "b"]) == ["m1:'a'", "m1:'b'"]
    assert mode.call(f, ["c", "b", "d", "a", "e"]) == ["m1:'c'", "m1:'b'", "m1:'d'", "m1:'a'", "m1:'e'"]
    assert emb.batches == [["a", "b"], ["c", "d", "e"]]
    stats = cache.stats()
    assert (stats.l1_hits, stats.misses, stats.loads) == (2, 5, 2)


def test_duplicates_are_computed_once_and_answered_at_each_position(mode: Any, cache: TieredCache) -> None:
    emb = Embedder()
    f = tiered_batch(cache)(emb.function(mode))
    assert mode.call(f, ["x", "y", "x", "x", "y"]) == ["m1:'x'", "m1:'y'", "m1:'x'", "m1:'x'", "m1:'y'"]
    assert emb.batches == [["x", "y"]]
    assert mode.call(f, ["y", "y"]) == ["m1:'y'", "m1:'y'"]
    assert emb.batches == [["x", "y"]]


def test_later_batches_and_single_items_hit(mode: Any, cache: TieredCache) -> None:
    emb = Embedder()
    f = tiered_batch(cache)(emb.function(mode))
    mode.call(f, [1, 2, 3])
    assert mode.call(f, [3, 2]) == ["m1:3", "m1:2"]
    assert mode.call(f, [2]) == ["m1:2"]
    assert mode.call(f, (1,)) == ["m1:1"]  # any sequence of items
    assert mode.call(f, []) == []
    assert mode.call(f, [4, 1]) == ["m1:4", "m1:1"]
    assert emb.batches == [[1, 2, 3], [4]]


def test_items_of_different_types_never_share_a_key(mode: Any, cache: TieredCache) -> None:
    emb = Embedder()
    f = tiered_batch(cache)(emb.function(mode))
    items = [1, "1", 1.5, True, None, (1,), [1], {"a": 1}, b"1"]
    assert mode.call(f, items) == [f"m1:{i!r}" for i in items]
    assert emb.batches == [items]
    assert len(set(f.keys(items))) == len(items)
    assert mode.call(f, list(reversed(items))) == [f"m1:{i!r}" for i in reversed(items)]
    assert len(emb.batches) == 1


def test_other_arguments_are_part_of_each_items_key(mode: Any, cache: TieredCache) -> None:
    emb = Embedder()
    f = tiered_batch(cache)(emb.function(mode))
    assert mode.call(f, ["a"], model="m1") == ["m1:'a'"]
    assert mode.call(f, ["a"], model="m2") == ["m2:'a'"]
    assert mode.call(f, ["a", "b"], "m2") == ["m2:'a'", "m2:'b'"]
    assert emb.batches == [["a"], ["a"], ["b"]]
    # the default, positional and keyword forms of the same call share keys
    assert mode.call(f, ["a"]) == ["m1:'a'"]
    assert mode.call(f, items=["a"], model="m1") == ["m1:'a'"]
    assert len(emb.batches) == 3
    assert f.keys(["a"]) == f.keys(["a"], "m1") == f.keys(items=["a"], model="m1") != f.keys(["a"], "m2")


def test_keys_and_invalidate_work_per_item(mode: Any, cache: TieredCache) -> None:
    emb = Embedder()
    f = tiered_batch(cache)(emb.function(mode))
    mode.call(f, ["a", "b", "c"])
    keys = f.keys(["a", "b", "a"])
    assert keys[0] == keys[2] != keys[1]
    assert all(k.startswith("tc:batch:v1:f:") for k in keys)
    mode.run(f.invalidate(["a", "c", "a"]))
    assert mode.call(f, ["a", "b", "c"]) == ["m1:'a'", "m1:'b'", "m1:'c'"]
    assert emb.batches[-1] == ["a", "c"]


@pytest.mark.parametrize("bad", [["only one"], [], "xy", None, {"a": 1}, 3])
def test_wrong_number_of_results_is_a_type_error_naming_the_function(
    mode: Any, cache: TieredCache, fake: Fake, bad: Any
) -> None:
    emb = Embedder()
    f = tiered_batch(cache)(emb.function(mode))
    emb.compute = lambda items, model: bad  # type: ignore[method-assign]
    with pytest.raises(TypeError, match=r"embed returned .* for 2 items"):
        mode.call(f, ["a", "b"])
    assert fake.markers() == []
    assert cache.stats().l1_size == 0


def test_items_must_be_a_sequence(mode: Any) -> None:
    cache = TieredCache(namespace="batch")
    emb = Embedder()
    f = tiered_batch(cache)(emb.function(mode))
    for bad in ("abc", b"abc", 42, {1, 2}):
        with pytest.raises(TypeError, match="items= must be a list"):
            mode.call(f, bad)
    with pytest.raises(TypeError, match="embed"):
        mode.call(f, ["a"], "m1", "extra")
    assert emb.batches == []


def test_configuration_is_checked() -> None:
    cache = TieredCache(namespace="batch")
    with pytest.raises(ConfigError):
        tiered_batch("not a cache")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="ttl"):
        tiered_batch(cache, ttl=-1)
    with pytest.raises(ConfigError, match="ttl_jitter"):
        tiered_batch(cache, ttl_jitter=1.0)
    with pytest.raises(ConfigError, match="first parameter"):
        tiered_batch(cache)(lambda *items: list(items))
    with pytest.raises(ConfigError, match="first parameter"):
        tiered_batch(cache)(lambda: [])
    with pytest.raises(ConfigError, match="braces"):
        tiered_batch(cache, name="a{b}")(lambda items: items)


def test_an_invalidation_during_the_load_wins(mode: Any, fake: Fake) -> None:
    """Invariant 3: the items invalidated while the function runs are returned to this call but
    stored nowhere (their lease marker was replaced); the others are stored."""
    cache = fake.cache()
    emb = Embedder()
    f = tiered_batch(cache)(emb.function(mode))

    def invalidate_a() -> Any:
        emb.during = None
        return f.invalidate(["a"])

    emb.during = invalidate_a
    assert mode.call(f, ["a", "b"]) == ["m1:'a'", "m1:'b'"]
    key_a, key_b = f.keys(["a", "b"])
    assert fake.raw.get(key_a) is None
    assert fake.raw.get(key_b) is not None
    assert mode.call(f, ["a", "b"]) == ["m1:'a'", "m1:'b'"]
    assert emb.batches == [["a", "b"], ["a"]]


def test_another_processes_lease_is_respected(mode: Any, fake: Fake) -> None:
    cache = fake.cache()
    emb = Embedder()
    f = tiered_batch(cache)(emb.function(mode))
    (key,) = f.keys(["a"])
    marker = LEASE_PREFIX + b"someone-else:1"
    fake.raw.set(key, marker, px=10_000)
    assert mode.call(f, ["a", "b"]) == ["m1:'a'", "m1:'b'"]
    assert fake.raw.get(key) == marker  # not overwritten: the holder's fill will land
    assert emb.batches == [["a", "b"]]


# -- numpy ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4).T,  # not contiguous
        np.zeros((0, 3), dtype=np.float64),
        np.array(5, dtype=np.int16),
        np.array([1 + 2j], dtype=np.complex64),
        np.array([True, False]),
        np.arange(4, dtype=">f4"),  # big-endian
        np.array([np.nan, -0.0, np.inf], dtype=np.float32),
    ],
    ids=["transposed", "empty", "0-d", "complex", "bool", "big-endian", "special"],
)
def test_numeric_arrays_keep_dtype_shape_and_values(mode: Any, fake: Fake, array: Any) -> None:
    writer, reader = fake.cache(), fake.cache()
    fw = tiered_batch(writer, name="arr")(Embedder(lambda item, model: array).function(mode))
    fr = tiered_batch(reader, name="arr")(Embedder(lambda item, model: None).function(mode))
    mode.call(fw, ["x"])
    (got,) = mode.call(fr, ["x"])
    assert got.dtype == array.dtype and got.shape == array.shape
    assert got.tobytes() == np.ascontiguousarray(array).tobytes()


# -- tenants ------------------------------------------------------------------------------------


def test_batch_entries_are_isolated_per_tenant(mode: Any) -> None:
    """``TieredCache(tenants=True)``: "every key of the cache depends on the current tenant"
    (docs/tags-and-tenants.md), so a batch computed in one tenant must not answer another."""
    cache = TieredCache(namespace="batch", tenants=True)
    current = {"tenant": None}
    emb = Embedder(lambda item, model: (current["tenant"], item))
    f = tiered_batch(cache)(emb.function(mode))
    for tenant in ("acme", "globex"):
        current["tenant"] = tenant
        with cache.tenant(tenant):
            assert mode.call(f, ["report"]) == [(tenant, "report")]


def test_a_partial_with_a_name_can_be_decorated(mode: Any) -> None:
    """``callable(fn)`` is what the decorator checks; with ``name=`` given, nothing else about
    the callable should matter (a ``functools.partial`` binding the model, say)."""
    cache = TieredCache(namespace="batch")
    emb = Embedder()
    f = tiered_batch(cache, name="embed.m2")(functools.partial(emb.function(mode), model="m2"))
    assert mode.call(f, ["a"]) == ["m2:'a'"]
    assert mode.call(f, ["a"]) == ["m2:'a'"]
    assert emb.batches == [["a"]]


def test_unreadable_values_in_redis_are_replaced(mode: Any, fake: Fake) -> None:
    """As with ``@tiered`` (the replace script): bytes that cannot be decoded count as a miss,
    and the result computed for them replaces them, so other caches read it from Redis
    instead of computing it again for as long as the unreadable bytes live."""
    a, b = fake.cache(), fake.cache()
    emb_a, emb_b = Embedder(), Embedder()
    fa = tiered_batch(a, name="garbage")(emb_a.function(mode))
    fb = tiered_batch(b, name="garbage")(emb_b.function(mode))
    (key,) = fa.keys(["x"])
    fake.raw.set(key, b"not an envelope")
    assert mode.call(fa, ["x"]) == ["m1:'x'"]
    assert a.stats().codec_errors == 1
    assert mode.call(fb, ["x"]) == ["m1:'x'"]
    assert emb_b.batches == []
    assert b.stats().l2_hits == 1


def test_concurrent_batches_compute_each_item_once_in_a_process(joined: Joined) -> None:
    """Two calls that miss the same items at once: the second waits for the first's items
    (single-flight per item) and computes only the ones nobody else is computing."""
    cache = TieredCache(namespace="batch-flight")
    go = threading.Event()
    computed: list[list[str]] = []

    @tiered_batch(cache)
    def embed(texts: list[str]) -> list[str]:
        computed.append(list(texts))
        if len(computed) == 1:
            assert go.wait(5)
        return [t.upper() for t in texts]

    first: list[Any] = []
    t = threading.Thread(target=lambda: first.append(embed(["a", "b"])))
    t.start()
    while not computed:  # the first call is computing ["a", "b"]
        time.sleep(0.001)
    second: list[Any] = []
    u = threading.Thread(target=lambda: second.append(embed(["b", "c", "a"])))
    u.start()
    joined.block(1)  # the second call computed "c", then waits on the first's items
    go.set()
    t.join(5)
    u.join(5)
    assert first == [["A", "B"]] and second == [["B", "C", "A"]]
    assert computed == [["a", "b"], ["c"]]
    assert cache.stats().in_flight == 0


def test_a_failed_batch_leaves_joined_items_to_the_waiting_call() -> None:
    import threading

    cache = TieredCache(namespace="batch-flight-fail")
    started, go = threading.Event(), threading.Event()
    computed: list[list[str]] = []

    @tiered_batch(cache)
    def embed(texts: list[str]) -> list[str]:
        computed.append(list(texts))
        if len(computed) == 1:
            started.set()
            assert go.wait(5)
            raise RuntimeError("model down")
        return [t.upper() for t in texts]

    errors: list[BaseException] = []

    def first() -> None:
        try:
            embed(["a"])
        except RuntimeError as exc:
            errors.append(exc)

    t = threading.Thread(target=first)
    t.start()
    assert started.wait(5)
    out: list[Any] = []
    u = threading.Thread(target=lambda: out.append(embed(["a", "b"])))
    u.start()
    go.set()
    t.join(5)
    u.join(5)
    assert len(errors) == 1 and out == [["A", "B"]]
    assert sorted(map(sorted, computed[1:])) == [["a"], ["b"]], computed
    assert cache.stats().in_flight == 0


def test_after_a_failed_batch_its_waiters_retry_as_one(joined: Joined) -> None:
    """Five calls wait on one that fails: they retry single-flighted (one more call), not five."""
    cache = TieredCache(namespace="batch-flight-retry")
    calls: list[list[int]] = []
    lock = threading.Lock()

    @tiered_batch(cache)
    def f(xs: list[int]) -> list[int]:
        with lock:
            calls.append(list(xs))
            n = len(calls)
        if n == 1:
            joined.block(5)  # the five others wait on this call's items
            raise RuntimeError("backend down")
        joined.block(5 + 4)  # the four that did not lead the retry wait on this one
        return [x * 2 for x in xs]

    out: list[Any] = []

    def run() -> None:
        try:
            out.append(f([1, 2, 3]))
        except RuntimeError as exc:
            out.append(exc)

    first = threading.Thread(target=run)
    first.start()
    while not calls:
        time.sleep(0.001)
    others = [threading.Thread(target=run) for _ in range(5)]
    for t in others:
        t.start()
    for t in [first, *others]:
        t.join(5)
    assert len(calls) == 2, calls
    assert sum(isinstance(o, RuntimeError) for o in out) == 1
    assert out.count([2, 4, 6]) == 5

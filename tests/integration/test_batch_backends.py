"""``@tiered_batch`` scenarios written once and run on fakeredis and on a real redis-server
(``backend``), through the sync and the async driver (``mode``): failures give every lease
back and keep nothing, numpy arrays come back from Redis as they were stored, values over
``max_value_bytes`` are returned but never stored."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tests.support import Embedder, FakeRedisCaches
from tiercache import TieredCache, tiered_batch
from tiercache._remote import LEASE_PREFIX


def values(backend: FakeRedisCaches) -> dict[bytes, bytes]:
    """What the test's namespace holds in Redis."""
    return {k: backend.raw.get(k) for k in backend.raw.keys(f"tc:{backend.namespace}:v1:*".encode())}


def markers(backend: FakeRedisCaches) -> list[bytes]:
    return [k for k, v in values(backend).items() if v is not None and v.startswith(LEASE_PREFIX)]


def test_a_raising_or_miscounting_function_caches_nothing_and_gives_its_leases_back(
    mode: Any, backend: FakeRedisCaches
) -> None:
    for cache in (TieredCache(namespace=backend.namespace), backend.cache()):  # L1 only, and on Redis
        emb = Embedder()
        f = tiered_batch(cache)(emb.function(mode))
        mode.call(f, ["a"])
        emb.fail = ValueError("model overloaded")
        with pytest.raises(ValueError, match="model overloaded"):
            mode.call(f, ["a", "b", "c"])
        assert emb.batches[-1] == ["b", "c"]
        assert markers(backend) == []
        assert cache.stats().load_errors == 1
        emb.fail = None
        assert mode.call(f, ["b", "a", "c"]) == ["m1:'b'", "m1:'a'", "m1:'c'"]
        assert emb.batches[-1] == ["b", "c"]  # nothing of the failed call was kept
    stored = f.keys(["a", "b", "c"])  # f on Redis, from the last round
    wrong = tiered_batch(cache, name="fail.wrong")(lambda items: items[:1])
    with pytest.raises(TypeError, match=r"<lambda> returned 1 results for 2 items"):
        wrong(["x", "y"])
    assert markers(backend) == []
    assert sorted(values(backend)) == sorted(k.encode() for k in stored)  # only what succeeded


def vectors(item: Any, model: str) -> Any:
    rng = np.random.default_rng(abs(hash((item, model))) % 2**32)
    return rng.standard_normal(8).astype(np.float32)


def test_numpy_arrays_round_trip_through_redis(mode: Any, backend: FakeRedisCaches) -> None:
    """Bit for bit, dtype and shape kept, writable or read-only as the function returned them;
    an object array is returned but never stored."""
    objects = np.array([{"a": 1}, None], dtype=object)

    def result(item: Any, model: str) -> Any:
        return objects if item == "obj" else vectors(item, model)

    writer, reader = backend.cache(), backend.cache()
    emb_w, emb_r = Embedder(result), Embedder(result)
    fw = tiered_batch(writer, name="emb")(emb_w.function(mode))
    fr = tiered_batch(reader, name="emb")(emb_r.function(mode))
    items = ["a", "b", "obj", "c"]
    computed = mode.call(fw, items)
    assert computed[2] is objects
    assert writer.stats().not_cached == 1
    read = mode.call(fr, ["a", "b", "c"])
    assert emb_r.batches == []
    assert reader.stats().l2_hits == 3
    for c, r in zip([computed[0], computed[1], computed[3]], read, strict=True):
        assert isinstance(r, np.ndarray)
        assert r.dtype == np.float32 and r.shape == (8,)
        assert r.tobytes() == c.tobytes()  # bit for bit
        assert r.flags.writeable == c.flags.writeable  # as the function returned it: L1 and L2 agree
    assert mode.call(fr, ["b"])[0] is read[1]  # from the reader's L1 now: the same array
    assert mode.call(fr, ["obj"])[0] is objects and emb_r.batches == [["obj"]]  # never stored
    assert backend.raw.get(fw.keys(["obj"])[0]) is None
    assert markers(backend) == []


def test_values_over_max_value_bytes_are_returned_not_cached(mode: Any, backend: FakeRedisCaches) -> None:
    for cache in (
        TieredCache(namespace=backend.namespace, max_value_bytes=200, compression=None),
        backend.cache(max_value_bytes=200, compression=None),
    ):
        emb = Embedder(lambda item, model: item * 300 if item.startswith("big") else item)
        f = tiered_batch(cache)(emb.function(mode))
        assert mode.call(f, ["big1", "s", "big2"]) == ["big1" * 300, "s", "big2" * 300]
        assert cache.stats().not_cached == 2
        assert mode.call(f, ["s", "big1", "big2"]) == ["s", "big1" * 300, "big2" * 300]
        assert emb.batches == [["big1", "s", "big2"], ["big1", "big2"]]
        assert cache.stats().not_cached == 4
    assert markers(backend) == []
    assert len(values(backend)) == 1  # only "s" reached Redis

"""Tags and tenants across two caches, written once and run on fakeredis and on a real
redis-server (``backend``), through the sync and the async driver (``mode``): a tag or tenant
invalidation reaches the other cache and drops exactly what it names."""

from __future__ import annotations

from typing import Any

from tests.support import FakeRedisCaches, Loader, SyncOnly
from tests.unit.test_tags_tenants import computed, within
from tiercache import tiered


def test_tag_invalidation_reaches_another_cache(mode: Any, backend: FakeRedisCaches) -> None:
    a, b = backend.cache(), backend.cache()
    loaders = [Loader(SyncOnly, computed), Loader(SyncOnly, computed)]
    pairs = list(zip((a, b), loaders, strict=True))
    tagged = [tiered(c, name="t.tagged", tags=lambda x: [f"x:{x}", "every"])(ld.fn(mode)) for c, ld in pairs]
    other = [tiered(c, name="t.other", tags=["other"])(ld.fn(mode)) for c, ld in pairs]
    plain = [tiered(c, name="t.plain")(ld.fn(mode)) for c, ld in pairs]

    def read(i: int) -> tuple[Any, ...]:
        return tuple(mode.call(f, x) for f, x in ((tagged[i], 1), (tagged[i], 2), (other[i], 1), (plain[i], 1)))

    first = read(0)
    v1, v2, o1, p1 = first
    for _ in range(2):  # b reads a's values from Redis, then from its own L1
        assert read(1) == first
    assert loaders[1].calls == 0
    assert b.stats().l2_hits == 4
    assert b.stats().l1_hits == 4

    result = mode.run(mode.api(a).invalidate_tags("x:1", wait=True))
    assert result.complete and result.receivers == 2, result
    hits = b.stats().l1_hits
    assert (mode.call(tagged[1], 2), mode.call(other[1], 1), mode.call(plain[1], 1)) == (v2, o1, p1)
    assert b.stats().l1_hits == hits + 3  # the other tags' and the untagged entries stayed in b's L1
    new = mode.call(tagged[1], 1)
    assert new != v1
    assert [r[:2] for r in loaders[1].results] == [(None, 1)]  # b computed it again
    assert mode.call(tagged[0], 1) == new  # and a reads b's new value

    result = mode.run(mode.api(b).invalidate_tags("every", wait=True))
    assert result.complete, result
    assert mode.call(tagged[0], 1) != new
    assert mode.call(tagged[0], 2) != v2
    assert (mode.call(other[0], 1), mode.call(plain[0], 1)) == (o1, p1)


def test_tenant_invalidation_reaches_another_cache(mode: Any, backend: FakeRedisCaches) -> None:
    a, b = backend.cache(tenants=True), backend.cache(tenants=True)
    loaders = [Loader(SyncOnly, computed), Loader(SyncOnly, computed)]
    fs = [tiered(c, name="ten.f")(ld.fn(mode)) for c, ld in zip((a, b), loaders, strict=True)]
    values = {}
    for tenant in ("acme", "{globex}", None):
        with within(a, tenant):
            values[tenant] = mode.call(fs[0], 1)
            mode.run(mode.api(a).set("k", f"v-{tenant}"))
        with within(b, tenant):
            assert mode.call(fs[1], 1) == values[tenant]  # the same tenant in another cache: shared
            assert mode.run(mode.api(b).get("k")) == f"v-{tenant}"
    assert loaders[1].calls == 0
    with within(b, "initech"):
        assert mode.run(mode.api(b).get("k")) is None
        assert mode.call(fs[1], 1)[0] == "initech"

    result = mode.run(mode.api(b).invalidate_tenant("acme", wait=True))
    assert result.complete, result
    for cache, f in ((a, fs[0]), (b, fs[1])):
        with within(cache, "acme"):
            assert mode.run(mode.api(cache).get("k")) is None
        for tenant in ("{globex}", None):
            with within(cache, tenant):
                assert mode.call(f, 1) == values[tenant]
                assert mode.run(mode.api(cache).get("k")) == f"v-{tenant}"
    with within(a, "acme"):
        fresh = mode.call(fs[0], 1)
    assert fresh != values["acme"] and fresh[0] == "acme"
    assert loaders[0].results[-1][:2] == ("acme", 1)
    with within(b, "acme"):
        assert mode.call(fs[1], 1) == fresh

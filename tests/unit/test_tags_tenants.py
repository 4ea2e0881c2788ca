"""Tags and tenants on L1-only caches and fakeredis: ``tiered(tags=..., tenant=...)``,
``cache.invalidate_tags``, ``TieredCache(tenants=True)`` with ``cache.tenant(...)``,
``cache.invalidate_tenant``, context propagation, and a Hypothesis state machine checking that
no call in one tenant ever answers with a value computed in another. (Invalidations reaching
another cache: tests/integration/test_tags_tenants_backends.py, on fakeredis and real Redis.)

Every function below returns ``(tenant it was computed in, argument, serial number)``: the
tenant comes from ``COMPUTED_IN``, a context variable the test sets next to ``cache.tenant``,
so a value that leaks across tenants is recognisable wherever it is returned."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import fakeredis
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test

from tests.support import Clock, FakeRedisCaches, Loader, SyncOnly
from tiercache import ConfigError, KeyEncodingError, TieredCache, tiered

COMPUTED_IN: contextvars.ContextVar[str | None] = contextvars.ContextVar("computed_in", default=None)


SERIAL = itertools.count(1)  # shared: no two computations anywhere return equal values


def computed(x: Any, *rest: Any, **kw: Any) -> tuple[str | None, Any, int]:
    """What the functions below return: (tenant it was computed in, argument, serial number)."""
    return (COMPUTED_IN.get(), x, next(SERIAL))


@contextlib.contextmanager
def within(cache: TieredCache, tenant: str | None) -> Iterator[None]:
    """``cache.tenant(tenant)`` (nothing for None), with COMPUTED_IN set to match."""
    token = COMPUTED_IN.set(tenant)
    try:
        if tenant is None:
            yield
        else:
            with cache.tenant(tenant):
                yield
    finally:
        COMPUTED_IN.reset(token)


class FakePair(FakeRedisCaches):
    """Caches on one fakeredis server (coherent through its pub/sub)."""

    def __init__(self, mode: Any) -> None:
        super().__init__(mode, "tags")


@pytest.fixture
def fake(mode: Any) -> Iterator[FakePair]:
    pair = FakePair(mode)
    yield pair
    pair.close()


# -- tags -------------------------------------------------------------------------------------


def test_static_tags_invalidate_exactly_the_tagged_entries(mode: Any) -> None:
    cache = TieredCache(namespace="tags")
    users, orders, plain = Loader(SyncOnly, computed), Loader(SyncOnly, computed), Loader(SyncOnly, computed)
    f_users = tiered(cache, tags=["users"])(users.fn(mode))
    f_orders = tiered(cache, tags=["orders"])(orders.fn(mode))
    f_plain = tiered(cache)(plain.fn(mode))
    before = {(f, x): mode.call(f, x) for f in (f_users, f_orders, f_plain) for x in (1, 2)}
    for (f, x), value in before.items():
        assert mode.call(f, x) == value  # cached
    assert users.calls == orders.calls == plain.calls == 2

    mode.run(mode.api(cache).invalidate_tags("users"))

    for (f, x), value in before.items():
        if f is f_users:
            assert mode.call(f, x) != value  # recomputed
        else:
            assert mode.call(f, x) == value
    assert users.calls == 4
    assert orders.calls == plain.calls == 2
    assert mode.call(f_users, 1) == mode.call(f_users, 1)  # cached again under the new version
    assert users.calls == 4


def test_tags_as_a_function_of_the_arguments(mode: Any) -> None:
    cache = TieredCache(namespace="tags")
    loader = Loader(SyncOnly, computed)
    f = tiered(cache, tags=lambda user, day: [f"user:{user}", f"day:{day}"])(loader.fn(mode))
    calls = [(1, "mon"), (1, "tue"), (2, "mon"), (2, "tue")]
    first = {c: mode.call(f, *c) for c in calls}
    assert loader.calls == 4

    mode.run(mode.api(cache).invalidate_tags("user:1"))
    second = {c: mode.call(f, *c) for c in calls}
    assert [c for c in calls if second[c] != first[c]] == [(1, "mon"), (1, "tue")]

    mode.run(mode.api(cache).invalidate_tags("day:tue"))
    third = {c: mode.call(f, *c) for c in calls}
    assert [c for c in calls if third[c] != second[c]] == [(1, "tue"), (2, "tue")]

    # several tags in one call; an unknown tag and no tag at all change nothing
    mode.run(mode.api(cache).invalidate_tags("user:2", "day:mon"))
    fourth = {c: mode.call(f, *c) for c in calls}
    assert [c for c in calls if fourth[c] != third[c]] == [(1, "mon"), (2, "mon"), (2, "tue")]
    mode.run(mode.api(cache).invalidate_tags("never-used"))
    mode.run(mode.api(cache).invalidate_tags())
    assert {c: mode.call(f, *c) for c in calls} == fourth


def test_tags_function_may_return_a_single_name(mode: Any) -> None:
    cache = TieredCache(namespace="tags")
    loader = Loader(SyncOnly, computed)
    f = tiered(cache, tags=lambda x: f"item:{x}")(loader.fn(mode))
    a, b = mode.call(f, "a"), mode.call(f, "b")
    mode.run(mode.api(cache).invalidate_tags("item:a"))
    assert mode.call(f, "a") != a
    assert mode.call(f, "b") == b


def test_key_of_a_tagged_call_follows_the_tag_version_and_invalidate_drops_one_entry(mode: Any) -> None:
    cache = TieredCache(namespace="tags")
    loader = Loader(SyncOnly, computed)
    f = tiered(cache, tags=["t"])(loader.fn(mode))
    key = f.key(1)
    assert key == f.key(1)
    a1, a2 = mode.call(f, 1), mode.call(f, 2)
    mode.call(f.invalidate, 1)  # this call's entry only
    assert mode.call(f, 1) != a1
    assert mode.call(f, 2) == a2
    mode.run(mode.api(cache).invalidate_tags("t"))
    assert f.key(1) != key


def test_tag_and_tenant_arguments_are_validated() -> None:
    cache = TieredCache(namespace="tags")
    with pytest.raises(ConfigError, match="tags="):
        tiered(cache, tags="users")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="tenant="):
        tiered(cache, tenant="acme")  # type: ignore[arg-type]
    f = tiered(cache, name="bad-tag", tags=lambda x: [""])(lambda x: x)
    with pytest.raises(KeyEncodingError):
        f(1)
    with pytest.raises(KeyEncodingError):
        cache.invalidate_tags("")


# -- tenants ------------------------------------------------------------------------------------


def test_decorated_calls_are_isolated_per_tenant(mode: Any) -> None:
    cache = TieredCache(namespace="ten", tenants=True)
    loader = Loader(SyncOnly, computed)
    f = tiered(cache)(loader.fn(mode))
    seen = {}
    for tenant in ("a", "b", None):
        with within(cache, tenant):
            seen[tenant] = mode.call(f, 1)
            assert seen[tenant][0] == tenant
    assert len({v[2] for v in seen.values()}) == 3
    for tenant in ("a", "b", None):
        with within(cache, tenant):
            assert mode.call(f, 1) == seen[tenant]
    assert loader.calls == 3
    # the keys differ too, and the shared scope's key is the plain one
    keys = set()
    for tenant in ("a", "b", None):
        with within(cache, tenant):
            keys.add(f.key(1))
    assert len(keys) == 3


def test_get_set_delete_are_isolated_per_tenant(mode: Any) -> None:
    cache = TieredCache(namespace="ten", tenants=True)
    api = mode.api(cache)
    for tenant in ("a", "b", None):
        with within(cache, tenant):
            mode.run(api.set("k", f"value of {tenant}"))
    for tenant in ("a", "b", None):
        with within(cache, tenant):
            assert mode.run(api.get("k")) == f"value of {tenant}"
    with within(cache, "c"):
        assert mode.run(api.get("k", "absent")) == "absent"
    with within(cache, "a"):
        mode.run(api.delete("k"))
        assert mode.run(api.get("k")) is None
    with within(cache, "b"):
        assert mode.run(api.get("k")) == "value of b"
    assert mode.run(api.get("k")) == "value of None"


def org_body(mode: Any, loader: Loader) -> Callable[..., Any]:
    if mode.is_async:

        async def abody(org: str, day: str = "mon") -> Any:
            return loader(org, day)

        return abody

    def body(org: str, day: str = "mon") -> Any:
        return loader(org, day)

    return body


def test_tenant_argument_form(mode: Any) -> None:
    """``tenant=`` is called with the call's own arguments (mirror the signature, defaults
    included); it works on a cache without ``tenants=True`` and wins over ``cache.tenant()``."""
    for tenants in (False, True):
        cache = TieredCache(namespace="ten", tenants=tenants)
        loader = Loader(SyncOnly, computed)
        f = tiered(cache, tenant=lambda org, day="mon": org)(org_body(mode, loader))
        acme, globex = mode.call(f, "acme"), mode.call(f, "globex", "tue")
        assert mode.call(f, "acme", "mon") == acme  # the same key as f("acme")
        assert mode.call(f, "globex", day="tue") == globex
        if tenants:
            with within(cache, "other"):
                assert mode.call(f, "acme") == acme  # the argument decides, not the context
        mode.run(mode.api(cache).invalidate_tenant("acme"))
        assert mode.call(f, "acme") != acme
        assert mode.call(f, "globex", "tue") == globex

    cache = TieredCache(namespace="ten")
    shared = Loader(SyncOnly, computed)
    g = tiered(cache, tenant=lambda org: org or None)(shared.fn(mode))
    v = mode.call(g, "")  # None: the shared scope
    mode.run(mode.api(cache).invalidate_tenant("x"))
    assert mode.call(g, "") == v
    bad = tiered(cache, tenant=lambda org: 4.2)(shared.fn(mode))
    with pytest.raises(KeyEncodingError, match="tenant"):
        mode.call(bad, "a")
    # An integer id names the same tenant as its decimal string.
    by_int = tiered(cache, name="by-id", tenant=lambda org: 42)(shared.fn(mode))
    by_str = tiered(cache, name="by-id", tenant=lambda org: "42")(shared.fn(mode))
    assert mode.call(by_int, "a") == mode.call(by_str, "a")


def test_tenant_needs_a_cache_with_tenants() -> None:
    cache = TieredCache(namespace="ten")
    with pytest.raises(ConfigError, match="tenants=True"), cache.tenant("a"):
        pass
    tenants = TieredCache(namespace="ten", tenants=True)
    for bad in ("", None, 7.5):
        with pytest.raises(KeyEncodingError), tenants.tenant(bad):  # type: ignore[arg-type]
            pass


ODD_TENANTS = ["{a}", "a}", "{", "}", "{}", "a:b", "with space", "ünïcødé ☃", "#", "\n\t", "x" * 500, "*", "?["]


def test_odd_tenant_names_work_and_stay_isolated(mode: Any, fake: FakePair) -> None:
    for cache in (TieredCache(namespace="ten", tenants=True), fake.cache(tenants=True)):
        loader = Loader(SyncOnly, computed)
        f = tiered(cache, name="odd.f")(loader.fn(mode))
        values = {}
        for tenant in ODD_TENANTS:
            with within(cache, tenant):
                values[tenant] = mode.call(f, 1)
                mode.run(mode.api(cache).set("k", tenant))
        assert loader.calls == len(ODD_TENANTS)
        for tenant in ODD_TENANTS:
            with within(cache, tenant):
                assert mode.call(f, 1) == values[tenant]
                assert values[tenant][0] == tenant
                assert mode.run(mode.api(cache).get("k")) == tenant
        mode.run(mode.api(cache).invalidate_tenant("{a}"))
        for tenant in ODD_TENANTS:
            with within(cache, tenant):
                assert (mode.call(f, 1) == values[tenant]) == (tenant != "{a}"), tenant


def test_nested_tenant_blocks_restore_the_outer_tenant(mode: Any) -> None:
    cache = TieredCache(namespace="ten", tenants=True)
    api = mode.api(cache)
    with cache.tenant("outer"):
        mode.run(api.set("k", "outer"))
        with cache.tenant("inner"):
            mode.run(api.set("k", "inner"))
        assert mode.run(api.get("k")) == "outer"
    assert mode.run(api.get("k")) is None
    with pytest.raises(RuntimeError), cache.tenant("a"):
        raise RuntimeError
    assert mode.run(api.get("k")) is None  # the block was left on the exception


def test_tenant_follows_asyncio_tasks() -> None:
    cache = TieredCache(namespace="ten", tenants=True)
    loader = Loader(SyncOnly, computed)

    async def body(x: int) -> tuple[str | None, Any, int]:
        await asyncio.sleep(0.001)
        return loader(x)

    f = tiered(cache)(body)

    async def scenario() -> None:
        tasks = {}
        for tenant in ("a", "b"):
            with within(cache, tenant):
                tasks[tenant] = asyncio.ensure_future(f(1))  # copies the context now
        got = {t: await task for t, task in tasks.items()}  # awaited outside any tenant
        assert {t: v[0] for t, v in got.items()} == {"a": "a", "b": "b"}

        async def in_tenant(tenant: str) -> Any:
            with within(cache, tenant):
                await asyncio.sleep(0.001)  # interleaves with the other tenants' tasks
                return await f(1), await cache.aio.get("k")

        for tenant in ("a", "b"):
            with within(cache, tenant):
                await cache.aio.set("k", tenant)
        results = await asyncio.gather(*(in_tenant(t) for t in ("a", "b", "a", "b")))
        assert [r[0] for r in results] == [got["a"], got["b"], got["a"], got["b"]]
        assert [r[1] for r in results] == ["a", "b", "a", "b"]
        assert await f(1) != got["a"]  # outside any tenant: the shared scope, computed anew
        assert loader.calls == 3

    asyncio.run(scenario())
    cache.close()


@pytest.mark.parametrize("timeout", ["soft_timeout", "hard_timeout"])
def test_tenant_follows_detached_loads(mode: Any, timeout: str) -> None:
    """With a soft or hard timeout the load runs on a worker thread or a task: it still sees the
    caller's tenant (here: ``cache.get`` inside the function reads the tenant's own key)."""
    cache = TieredCache(namespace="ten", tenants=True)
    for tenant in ("a", "b"):
        with cache.tenant(tenant):
            cache.set("who", f"tenant {tenant}")

    def body(x: int) -> Any:
        return cache.get("who", "no tenant")

    f = tiered(cache, **{timeout: 2.0})(mode.fn(body))
    for tenant in ("a", "b"):
        with cache.tenant(tenant):
            assert mode.call(f, 1) == f"tenant {tenant}"
    assert mode.call(f, 1) == "no tenant"


def test_tenant_follows_refreshes_ahead_of_expiry(mode: Any) -> None:
    clock = Clock()
    cache = TieredCache(namespace="ten", tenants=True, clock=clock)
    with cache.tenant("a"):
        cache.set("who", "a1")

    def body(x: int) -> Any:
        return cache.get("who", "no tenant")

    f = tiered(cache, ttl=100, refresh_after=10)(mode.fn(body))
    with cache.tenant("a"):
        assert mode.call(f, 1) == "a1"
        cache.set("who", "a2")
        clock.advance(20)  # past refresh_after: the next call answers and refreshes in the background
        assert mode.call(f, 1) == "a1"
        deadline = time.monotonic() + 5
        while mode.call(f, 1) != "a2":
            assert time.monotonic() < deadline, "the refresh never landed"
            if mode.is_async:
                mode.run(asyncio.sleep(0.005))  # the refresh is a task on the test's loop
            else:
                time.sleep(0.005)
    assert cache.stats().refreshes_ahead >= 1
    assert mode.call(f, 1) == "no tenant"  # the refresh stored tenant a's value under tenant a's key


# -- Redis cannot say the versions -----------------------------------------------------------


def test_versions_unreadable_answers_from_the_function_and_caches_nothing(mode: Any, fake: FakePair) -> None:
    cache = fake.cache(tenants=True, coherent=False, breaker_threshold=1000)
    loader = Loader(SyncOnly, computed)
    f = tiered(cache, name="down.f", tags=["t"])(loader.fn(mode))
    fake.server.connected = False
    try:
        with within(cache, "a"):
            first, second = mode.call(f, 1), mode.call(f, 1)
            assert first[0] == second[0] == "a"
            assert first != second  # computed each time: its key is unknown
            assert mode.run(mode.api(cache).set("k", "v")).seq is None
            assert mode.run(mode.api(cache).get("k", "default")) == "default"
        assert mode.call(f, 1) != mode.call(f, 1)  # tags without a tenant: the same
        assert cache.stats().l1_size == 0
        assert cache.stats().backend_errors > 0
    finally:
        fake.server.connected = True
    with within(cache, "a"):
        v = mode.call(f, 1)
        assert mode.call(f, 1) == v  # cached once the versions can be read
    keys = fake.raw.keys(b"tc:tags:v1:*")
    assert keys and all(re.fullmatch(rb"tc:tags:v1:f:down\.f:s[0-9a-f]{32}:\{[0-9a-f]{32}\}", k) for k in keys), keys


# -- the state machine --------------------------------------------------------------------------

TENANTS = st.sampled_from(["a", "b", "{c}", None])
ARGS = st.sampled_from([1, 2, "1"])


class TenantMachine(RuleBasedStateMachine):
    """Calls, sets, gets, deletes and invalidations in random tenants, on one or more caches
    that share a store; the model says what is cached per (tenant, argument)."""

    def make_caches(self) -> list[TieredCache]:
        raise NotImplementedError

    @initialize()
    def start(self) -> None:
        self.caches = self.make_caches()
        self.loader = Loader(SyncOnly, computed)
        self.fs = [tiered(c, name="machine.f", tags=lambda x: [f"arg:{x}"])(self.loader.fn()) for c in self.caches]
        self.cached: dict[tuple[str | None, Any], tuple[str | None, Any, int]] = {}
        self.stored: dict[tuple[str | None, str], Any] = {}

    def teardown(self) -> None:
        for cache in getattr(self, "caches", []):
            cache.close()

    def node(self, data: Any) -> int:
        return data.draw(st.integers(0, len(self.caches) - 1), label="node")

    @rule(data=st.data(), tenant=TENANTS, x=ARGS)
    def call(self, data: Any, tenant: str | None, x: Any) -> None:
        i = self.node(data)
        n = self.loader.calls
        with within(self.caches[i], tenant):
            value = self.fs[i](x)
        assert value[0] == tenant, f"a call in tenant {tenant!r} answered with a value computed in {value[0]!r}"
        assert value[1] == x and type(value[1]) is type(x)
        if (tenant, x) in self.cached:
            assert value == self.cached[(tenant, x)]
            assert self.loader.calls == n
        else:
            assert self.loader.calls == n + 1, "expected a fresh computation"
            self.cached[(tenant, x)] = value

    @rule(data=st.data(), tenant=TENANTS, k=st.sampled_from(["k", "{k}"]), v=st.integers(0, 9))
    def set(self, data: Any, tenant: str | None, k: str, v: int) -> None:
        i = self.node(data)
        with within(self.caches[i], tenant):
            self.caches[i].set(k, [tenant, v], wait=True)
        self.stored[(tenant, k)] = [tenant, v]

    @rule(data=st.data(), tenant=TENANTS, k=st.sampled_from(["k", "{k}"]))
    def get(self, data: Any, tenant: str | None, k: str) -> None:
        i = self.node(data)
        with within(self.caches[i], tenant):
            got = self.caches[i].get(k)
        assert got == self.stored.get((tenant, k))

    @rule(data=st.data(), tenant=TENANTS, k=st.sampled_from(["k", "{k}"]))
    def delete(self, data: Any, tenant: str | None, k: str) -> None:
        i = self.node(data)
        with within(self.caches[i], tenant):
            self.caches[i].delete(k, wait=True)
        self.stored.pop((tenant, k), None)

    @rule(data=st.data(), tenant=st.sampled_from(["a", "b", "{c}"]))
    def invalidate_tenant(self, data: Any, tenant: str) -> None:
        i = self.node(data)
        self.caches[i].invalidate_tenant(tenant, wait=True)
        self.cached = {k: v for k, v in self.cached.items() if k[0] != tenant}
        self.stored = {k: v for k, v in self.stored.items() if k[0] != tenant}

    @rule(data=st.data(), x=ARGS)
    def invalidate_tag(self, data: Any, x: Any) -> None:
        i = self.node(data)
        self.caches[i].invalidate_tags(f"arg:{x}", wait=True)
        self.cached = {k: v for k, v in self.cached.items() if f"arg:{k[1]}" != f"arg:{x}"}  # 1 and "1" share it


MACHINE_SETTINGS = settings(
    max_examples=40, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def test_no_call_answers_with_another_tenants_value_l1_only() -> None:
    class L1Only(TenantMachine):
        def make_caches(self) -> list[TieredCache]:
            return [TieredCache(namespace="machine", tenants=True)]

    run_state_machine_as_test(L1Only, settings=MACHINE_SETTINGS)


def test_no_call_answers_with_another_tenants_value_fakeredis_pair() -> None:
    class FakeredisPair(TenantMachine):
        def make_caches(self) -> list[TieredCache]:
            server = fakeredis.FakeServer()
            caches = [
                TieredCache(client=fakeredis.FakeRedis(server=server), namespace="machine", tenants=True)
                for _ in range(2)
            ]
            for cache in caches:
                assert cache.ready(5)
            return caches

    run_state_machine_as_test(
        FakeredisPair,
        settings=settings(MACHINE_SETTINGS, max_examples=15),
    )

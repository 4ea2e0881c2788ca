"""A state machine drives get/set/delete and cached functions (sync and async) against a dict model.

Two machines: an L1-only cache, where entries expire on the injected clock the rules advance
(the model keeps expiry times), and a cache over fakeredis with Redis TTLs far longer than the
test, where L1 expiry only sends reads to Redis and the model ignores time.
"""

from __future__ import annotations

import asyncio
from typing import Any

import fakeredis
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tests.support import Clock
from tiercache import TieredCache, tiered

ABSENT = "<absent>"
USER_KEYS = st.sampled_from(["a", "b", "item:1", "item:2"])
ARGS = st.sampled_from([1, 2])
VALUES = st.none() | st.integers(-3, 3) | st.text(max_size=3) | st.lists(st.integers(0, 3), max_size=3)
STEPS = st.sampled_from([0.25, 1.0, 2.0, 4.5, 30.0])

CACHE_TTL = 20.0
CACHE_L1_TTL = 5.0
PLAIN_L1_TTL = 2.0


class CacheMachine(RuleBasedStateMachine):
    REDIS = False
    PLAIN_TTL = 3.0

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock(100.0, frozen=True)
        self.loop = asyncio.new_event_loop()
        if self.REDIS:
            server = fakeredis.FakeServer()
            self.cache = TieredCache(
                client=fakeredis.FakeRedis(server=server),
                async_client=fakeredis.FakeAsyncRedis(server=server),
                namespace="machine",
                clock=self.clock,
                ttl=100_000.0,
                l1_ttl=CACHE_L1_TTL,
            )
            assert self.cache.ready()  # L1 takes entries once the invalidation subscriber is subscribed
            # Another process with no L1: it sees exactly what Redis holds.
            self.peer: TieredCache | None = TieredCache(
                client=fakeredis.FakeRedis(server=server), namespace="machine", l1_maxsize=0, coherent=False
            )
        else:
            self.cache = TieredCache(namespace="machine", clock=self.clock, ttl=CACHE_TTL, l1_ttl=CACHE_L1_TTL)
            self.peer = None
        # model: user key or ("plain", x) -> (value, expires_at); expiry ignored with Redis
        self.model: dict[Any, tuple[Any, float]] = {}
        self.calls = 0
        machine = self

        @tiered(self.cache, key=lambda x: f"item:{x}")
        def item(x: int) -> list[Any]:
            machine.calls += 1
            return ["item", x, machine.calls]

        @tiered(self.cache, key=lambda x: f"item:{x}")
        async def aitem(x: int) -> list[Any]:
            await asyncio.sleep(0)
            machine.calls += 1
            return ["item", x, machine.calls]

        @tiered(self.cache, ttl=self.PLAIN_TTL, l1_ttl=PLAIN_L1_TTL)
        def plain(x: int) -> list[Any]:
            machine.calls += 1
            return ["plain", x, machine.calls]

        self.item, self.aitem, self.plain = item, aitem, plain

    def teardown(self) -> None:
        self.loop.run_until_complete(self.cache.aclose())
        self.loop.close()
        if self.peer is not None:
            self.peer.close()

    # -- the model -----------------------------------------------------------------------------

    def live(self, key: Any) -> Any:
        entry = self.model.get(key)
        if entry is None:
            return ABSENT
        value, expires = entry
        if not self.REDIS and expires <= self.clock.now:
            del self.model[key]
            return ABSENT
        return value

    def remember(self, key: Any, value: Any, l1_ttl: float | None, ttl: float | None) -> None:
        effective = min(CACHE_L1_TTL if l1_ttl is None else l1_ttl, self.cache_ttl if ttl is None else ttl)
        self.model[key] = (value, self.clock.now + effective)

    @property
    def cache_ttl(self) -> float:
        return self.cache._core.ttl  # type: ignore[no-any-return]

    def check_call(
        self, key: Any, got: Any, before: int, kind: str, x: int, l1_ttl: float | None, ttl: float | None
    ) -> None:
        expected = self.live(key)
        if expected is ABSENT:
            assert self.calls == before + 1, "a miss must call the function exactly once"
            assert got == [kind, x, self.calls]
            self.remember(key, got, l1_ttl, ttl)
        else:
            assert self.calls == before, "a hit must not call the function"
            assert got == expected

    # -- rules ---------------------------------------------------------------------------------

    @rule(
        key=USER_KEYS,
        value=VALUES,
        ttl=st.sampled_from([None, 1.0, 2.5, 10.0]),
        l1_ttl=st.sampled_from([None, 0.0, 0.5, 3.0, 100.0]),
    )
    def set(self, key: str, value: Any, ttl: float | None, l1_ttl: float | None) -> None:
        if self.REDIS and ttl is not None:
            ttl *= 3600  # Redis TTLs must outlive the test; L1 ones follow the injected clock
        self.cache.set(key, value, ttl=ttl, l1_ttl=l1_ttl)
        self.remember(key, value, l1_ttl, ttl)

    @rule(key=USER_KEYS, value=VALUES)
    def aio_set(self, key: str, value: Any) -> None:
        self.loop.run_until_complete(self.cache.aio.set(key, value))
        self.remember(key, value, None, None)

    @rule(key=USER_KEYS)
    def get(self, key: str) -> None:
        assert self.cache.get(key, ABSENT) == self.live(key)

    @rule(key=USER_KEYS)
    def aio_get(self, key: str) -> None:
        assert self.loop.run_until_complete(self.cache.aio.get(key, ABSENT)) == self.live(key)

    @rule(keys=st.lists(USER_KEYS, max_size=3))
    def delete(self, keys: list[str]) -> None:
        self.cache.delete(*keys)
        for key in keys:
            self.model.pop(key, None)

    @rule(key=USER_KEYS)
    def aio_delete(self, key: str) -> None:
        self.loop.run_until_complete(self.cache.aio.delete(key))
        self.model.pop(key, None)

    @rule(x=ARGS)
    def call_item(self, x: int) -> None:
        before = self.calls
        got = self.item(x)
        self.check_call(f"item:{x}", got, before, "item", x, None, None)

    @rule(x=ARGS)
    def call_aitem(self, x: int) -> None:
        before = self.calls
        got = self.loop.run_until_complete(self.aitem(x))
        self.check_call(f"item:{x}", got, before, "item", x, None, None)

    @rule(x=ARGS)
    def call_plain(self, x: int) -> None:
        before = self.calls
        got = self.plain(x)
        self.check_call(("plain", x), got, before, "plain", x, PLAIN_L1_TTL, self.PLAIN_TTL)

    @rule(x=ARGS)
    def invalidate_item(self, x: int) -> None:
        self.item.invalidate(x)
        self.model.pop(f"item:{x}", None)

    @rule(x=ARGS)
    def invalidate_plain(self, x: int) -> None:
        self.plain.invalidate(x)
        self.model.pop(("plain", x), None)

    @rule(x=ARGS)
    def refresh_plain(self, x: int) -> None:
        before = self.calls
        got = self.plain.refresh(x)
        assert self.calls == before + 1
        assert got == ["plain", x, self.calls]
        self.remember(("plain", x), got, PLAIN_L1_TTL, self.PLAIN_TTL)

    @rule(seconds=STEPS)
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @precondition(lambda self: self.REDIS)
    @rule()
    def lose_l1(self) -> None:
        self.cache._core.local.clear()

    @precondition(lambda self: self.REDIS)
    @rule(key=USER_KEYS)
    def peer_reads_redis(self, key: str) -> None:
        assert self.peer is not None
        assert self.peer.get(key, ABSENT) == self.live(key)

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def nothing_in_flight(self) -> None:
        assert self.cache.stats().in_flight == 0

    @invariant()
    def l1_byte_count_is_consistent(self) -> None:
        local = self.cache._core.local
        assert local.bytes == sum(entry[2] for entry in local._data.values())

    @invariant()
    def stats_add_up(self) -> None:
        s = self.cache.stats()
        assert s.loads == self.calls
        assert s.load_errors == 0
        assert s.codec_errors == 0
        assert s.backend_errors == 0


class L1OnlyMachine(CacheMachine):
    REDIS = False


class RedisMachine(CacheMachine):
    REDIS = True
    PLAIN_TTL = 3600.0


MACHINE_SETTINGS = settings(max_examples=50, stateful_step_count=30, deadline=None, report_multiple_bugs=False)

TestL1OnlyCache = L1OnlyMachine.TestCase
TestL1OnlyCache.settings = MACHINE_SETTINGS
TestRedisCache = RedisMachine.TestCase
TestRedisCache.settings = MACHINE_SETTINGS

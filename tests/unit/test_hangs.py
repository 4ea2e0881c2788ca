"""Calls that used to wait for themselves forever (issue 9, items 6 and 7): a sync call on an
event loop's thread that joined a load led by that very loop, and a loader that reads its own
key (directly, from a task it awaits, or from a worker thread running a detached load).
Every scenario runs in a thread of its own and must end within ``BOUND`` seconds, so a hang
fails the test instead of hanging the suite."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support import Clock, FakeRedisCaches, Mode, eventually
from tiercache import TieredCache, tiered, tiered_batch
from tiercache._remote import LEASE_PREFIX

BOUND = 5.0  # seconds: every scenario here takes milliseconds; a hang waits forever
LONG_LEASE = 60.0  # a lease wait, if one happened, would outlast BOUND


def finishes(scenario: Callable[[], Any]) -> Any:
    """Run ``scenario`` on a daemon thread; its result, or a failure if it is still running
    after ``BOUND`` seconds (the thread is then left blocked: it is a daemon)."""
    outcome: list[Any] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(scenario())
        except BaseException as exc:  # handed to the test
            failure.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(BOUND)
    assert not thread.is_alive(), f"still waiting after {BOUND} s: the call waits for itself"
    if failure:
        raise failure[0]
    return outcome[0]


def call(mode: Mode, f: Callable[..., Any], *args: Any) -> Any:
    """``f(*args)``, run on a fresh event loop of this thread in async mode."""
    return asyncio.run(f(*args)) if mode.is_async else f(*args)


@pytest.fixture(params=["l1-only", "fakeredis"])
def cache(request: pytest.FixtureRequest, namespace: str) -> Iterator[TieredCache]:
    """A cache without Redis, or on fakeredis with a lease that would outlast BOUND."""
    if request.param == "l1-only":
        c = TieredCache(namespace=namespace)
        yield c
        c.close()
        return
    mode = Mode("sync")
    fake = FakeRedisCaches(mode, namespace, lease_ttl=LONG_LEASE)
    yield fake.cache()
    fake.close()


# -- item 6: a sync call on the loop's thread never joins a load that loop leads --------------


def _while_async_loads(cache: TieredCache, then: Callable[[], Any], **options: Any) -> tuple[Any, Any]:
    """Run, on a fresh event loop (in this thread), an async load of user key "k" held until
    ``then()`` (a sync call made from a coroutine of that loop) has returned; returns what
    ``then()`` and the async load returned."""
    started = asyncio.Event()
    release = asyncio.Event()

    @tiered(cache, name="shared", key=lambda x: f"k{x}", **options)
    async def load(x: int) -> str:
        started.set()
        await release.wait()
        return "async"

    async def main() -> tuple[Any, Any]:
        task = asyncio.create_task(load(1))
        await started.wait()
        got = then()  # blocks the loop: the async load cannot go on meanwhile
        release.set()
        return got, await task

    return asyncio.run(main())


def test_sync_get_on_the_loop_thread_does_not_join_that_loops_load(cache: TieredCache) -> None:
    got, loaded = finishes(lambda: _while_async_loads(cache, lambda: cache.get("k1", "absent")))
    assert (got, loaded) == ("absent", "async")  # not there yet: no wait for it
    assert cache.get("k1") == "async"


@pytest.mark.parametrize("options", [{}, {"soft_timeout": 30.0}, {"hard_timeout": 30.0}])
def test_sync_function_on_the_loop_thread_computes_instead_of_joining(
    cache: TieredCache, options: dict[str, Any]
) -> None:
    """A sync decorated function of the same key (name= and key= alike) called from a
    coroutine while the async one loads it, inline or detached (timeouts): it computes."""
    calls: list[int] = []

    @tiered(cache, name="shared", key=lambda x: f"k{x}", **options)
    def compute(x: int) -> str:
        calls.append(x)
        return "sync"

    got, loaded = finishes(lambda: _while_async_loads(cache, lambda: compute(1), **options))
    assert (got, loaded, calls) == ("sync", "async", [1])


def test_sync_call_on_a_loop_thread_does_not_wait_for_a_lease_of_this_process(namespace: str) -> None:
    """Neighbour: the key's lease is held by a load of this process (perhaps of this very loop,
    its flight detached by a flush): a sync call from a coroutine does not block its loop for
    the lease's TTL; it computes (and stores nothing: the lease is not its own). A lease of
    another process it waits for, like any caller (single-flight across processes)."""
    fake = FakeRedisCaches(Mode("sync"), namespace, lease_ttl=LONG_LEASE)
    try:
        cache = fake.cache()
        calls: list[int] = []
        holders: list[bytes | None] = []

        @tiered(cache, name="leased", key=lambda x: f"k{x}")
        def compute(x: int) -> str:
            calls.append(x)
            holders.append(fake.raw.get(compute.key(x)))  # whose lease is on the key meanwhile
            return "computed"

        async def main(x: int) -> str:
            return compute(x)

        redis_key = compute.key(1)
        ours = b"\xc7\x00" + cache._core.node_id.encode() + b":999"
        fake.raw.set(redis_key, ours, px=int(LONG_LEASE * 1000))
        assert finishes(lambda: asyncio.run(main(1))) == "computed"
        assert calls == [1]
        assert fake.raw.get(redis_key) == ours  # not stored over its lease

        # Another process's lease: waited for (here until its holder gives it back), on a loop's
        # thread as outside one.
        other_key = compute.key(2)
        fake.raw.set(other_key, b"\xc7\x00someone-else:1", px=int(LONG_LEASE * 1000))

        def holder_gives_it_back() -> None:
            fake.raw.delete(other_key)
            fake.raw.publish(cache._core.channel, json.dumps({"n": "someone-else", "f": [other_key]}))

        threading.Timer(0.3, holder_gives_it_back).start()
        assert finishes(lambda: asyncio.run(main(2))) == "computed"
        assert calls == [1, 2]
        assert holders[1] != b"\xc7\x00someone-else:1", "computed under the other process's lease"
    finally:
        fake.close()


# -- item 7: a loader that reads its own key ----------------------------------------------


def test_a_loader_reading_its_own_key_is_told_it_is_missing(mode: Mode, cache: TieredCache) -> None:
    seen: list[Any] = []

    if mode.is_async:

        @tiered(cache, key=lambda x: f"k{x}")
        async def load(x: int) -> str:
            seen.append(await cache.aio.get(f"k{x}", "absent"))
            seen.append(cache.get(f"k{x}", "absent"))  # a sync read from the loop, too
            return "v"

    else:

        @tiered(cache, key=lambda x: f"k{x}")
        def load(x: int) -> str:
            seen.append(cache.get(f"k{x}", "absent"))
            return "v"

    assert finishes(lambda: call(mode, load, 1)) == "v"
    assert seen == ["absent"] * len(seen) and seen
    assert cache.get("k1") == "v"


def test_a_loader_calling_itself_with_its_key_computes(mode: Mode, cache: TieredCache) -> None:
    """Recursion into the key being computed is what the function does without the cache: here
    ``key=`` maps every depth to one key and the recursion ends at depth 0."""
    if mode.is_async:

        @tiered(cache, key=lambda x, depth: f"k{x}")
        async def count(x: int, depth: int) -> int:
            return 0 if depth == 0 else 1 + await count(x, depth - 1)

    else:

        @tiered(cache, key=lambda x, depth: f"k{x}")
        def count(x: int, depth: int) -> int:
            return 0 if depth == 0 else 1 + count(x, depth - 1)

    assert finishes(lambda: call(mode, count, 1, 3)) == 3
    assert cache.get("k1") == 3  # the outermost call's result is the one stored


def test_a_loader_awaiting_a_task_that_reads_its_key(cache: TieredCache) -> None:
    """Through a task the loader starts (it runs in a copy of the loader's context)."""

    calls = 0

    @tiered(cache, key=lambda x: f"j{x}")
    async def once(x: int) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            return f"outer({await asyncio.create_task(once(x))})"
        return "inner"

    assert finishes(lambda: asyncio.run(once(1))) == "outer(inner)"


@pytest.mark.parametrize("options", [{"soft_timeout": 30.0}, {"hard_timeout": 30.0}])
def test_a_detached_loader_reading_its_own_key(mode: Mode, cache: TieredCache, options: dict[str, Any]) -> None:
    """Through a detached load (a worker thread in sync code, a task in async code)."""
    seen: list[Any] = []

    if mode.is_async:

        @tiered(cache, key=lambda x: f"k{x}", **options)
        async def load(x: int) -> str:
            seen.append(await cache.aio.get(f"k{x}", "absent"))
            return "v"

    else:

        @tiered(cache, key=lambda x: f"k{x}", **options)
        def load(x: int) -> str:
            seen.append(cache.get(f"k{x}", "absent"))
            return "v"

    assert finishes(lambda: call(mode, load, 1)) == "v"
    assert seen == ["absent"]


def test_loads_of_other_keys_from_a_loader_still_single_flight(mode: Mode, cache: TieredCache) -> None:
    """Only the key being computed is exempt: a loader reading another key caches it."""
    calls: list[int] = []

    if mode.is_async:

        @tiered(cache, key=lambda x: f"k{x}")
        async def load(x: int) -> int:
            calls.append(x)
            return 0 if x == 0 else 1 + await load(x - 1)

    else:

        @tiered(cache, key=lambda x: f"k{x}")
        def load(x: int) -> int:
            calls.append(x)
            return 0 if x == 0 else 1 + load(x - 1)

    assert finishes(lambda: (call(mode, load, 2), call(mode, load, 2))) == (2, 2)
    assert calls == [2, 1, 0]


# -- the same for batch functions (items single-flight like keys) ---------------------------


def test_sync_batch_on_the_loop_thread_computes_instead_of_joining(cache: TieredCache) -> None:
    started = asyncio.Event()
    release = asyncio.Event()

    @tiered_batch(cache, name="batch")
    async def aload(items: list[int]) -> list[str]:
        started.set()
        await release.wait()
        return [f"async{i}" for i in items]

    @tiered_batch(cache, name="batch")
    def sload(items: list[int]) -> list[str]:
        return [f"sync{i}" for i in items]

    async def main() -> tuple[Any, Any]:
        task = asyncio.create_task(aload([1, 2]))
        await started.wait()
        got = sload([1, 2, 3])  # blocks the loop that loads items 1 and 2
        release.set()
        return got, await task

    got, loaded = finishes(lambda: asyncio.run(main()))
    assert got == ["sync1", "sync2", "sync3"]
    assert loaded == ["async1", "async2"]


def test_a_batch_function_calling_itself_with_its_items_computes(mode: Mode, cache: TieredCache) -> None:
    depth = [0]

    if mode.is_async:

        @tiered_batch(cache, name="self-batch")
        async def load(items: list[int]) -> list[int]:
            depth[0] += 1
            if depth[0] == 1:
                return [10 * v for v in await load(items)]
            return list(items)

    else:

        @tiered_batch(cache, name="self-batch")
        def load(items: list[int]) -> list[int]:
            depth[0] += 1
            if depth[0] == 1:
                return [10 * v for v in load(items)]
            return list(items)

    assert finishes(lambda: call(mode, load, [1, 2])) == [10, 20]


def test_a_loader_calling_its_key_through_a_plain_thread_pool_finishes(namespace: str) -> None:
    """A thread pool does not carry the loader's context, so the inner call is not known to be
    re-entrant and joins the outer load, which waits for it: the join is bounded by lease_ttl
    (as a wait for another process's lease is), after which the inner call computes itself."""
    from concurrent.futures import ThreadPoolExecutor

    cache = TieredCache(namespace=namespace, lease_ttl=0.2)
    pool = ThreadPoolExecutor(1)

    @tiered(cache, key=lambda x, depth: f"k{x}")
    def count(x: int, depth: int) -> int:
        return 0 if depth == 0 else 1 + pool.submit(count, x, depth - 1).result()

    try:
        assert finishes(lambda: count(1, 1)) == 1
    finally:
        pool.shutdown(wait=False)
        cache.close()


def test_a_closed_coroutine_gives_its_lease_back(namespace: str) -> None:
    """A coroutine closed mid-load (``coro.close()``: GeneratorExit at its await) cannot await
    its clean-up; the driver finishes the flow as a cancelled one on a task, so the lease goes
    back at once and the next call computes instead of waiting lease_ttl (60 s here)."""
    mode = Mode("async")
    fake = FakeRedisCaches(mode, namespace, lease_ttl=LONG_LEASE)
    cache = fake.cache()
    started = asyncio.Event()
    runs: list[int] = []

    @tiered(cache, name="closing")
    async def slow(x: int) -> int:
        runs.append(x)
        started.set()
        await asyncio.sleep(3600 if len(runs) == 1 else 0)
        return x

    async def step_until_started(coro: Any) -> None:
        """Drive ``coro`` by hand (its futures awaited here) until its function runs, then close it."""
        value: Any = None
        while True:
            future = coro.send(value)
            if started.is_set():  # suspended in the function, lease taken
                break
            if future is None:
                await asyncio.sleep(0)
            else:
                await asyncio.wait([future])
        coro.close()

    async def main() -> int:
        await step_until_started(slow(1))
        for _ in range(200):  # the clean-up task runs
            await asyncio.sleep(0.005)
        leases = [k for k in fake.raw.keys("*") if (fake.raw.get(k) or b"").startswith(LEASE_PREFIX)]
        assert cache.stats().in_flight == 0
        assert leases == [], "the closed load left its lease behind"
        return await asyncio.wait_for(slow(1), BOUND)

    try:
        assert mode.run(main()) == 1
        assert runs == [1, 1]
    finally:
        fake.close()
        mode.close()


def test_a_batch_function_calling_itself_through_a_plain_thread_pool_finishes(namespace: str) -> None:
    """The batch read's joins are bounded the same way (one helper, ``Core.await_leader``)."""
    from concurrent.futures import ThreadPoolExecutor

    cache = TieredCache(namespace=namespace, lease_ttl=0.2)
    pool = ThreadPoolExecutor(1)
    depth = [0]

    @tiered_batch(cache, name="pooled-batch")
    def load(items: list[int]) -> list[int]:
        depth[0] += 1
        if depth[0] == 1:
            return [10 * v for v in pool.submit(load, items).result()]
        return list(items)

    try:
        assert finishes(lambda: load([1, 2])) == [10, 20]
    finally:
        pool.shutdown(wait=False)
        cache.close()


def test_waiters_of_a_load_slower_than_lease_ttl_take_it_over_one_at_a_time(namespace: str) -> None:
    """The bound on a join is not a stampede: past lease_ttl the first waiter leads a new load
    and the others join it and wait for it to its end (a caller's wait is bounded once), so
    a slow function runs twice at most, not once per waiter (8 here) nor once per lease_ttl."""
    cache = TieredCache(namespace=namespace, lease_ttl=0.2)
    gate = threading.Event()
    calls: list[int] = []

    @tiered(cache, name="slow")
    def slow(x: int) -> int:
        calls.append(x)
        assert gate.wait(BOUND)
        return x

    threads = [threading.Thread(target=slow, args=(1,)) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        eventually(lambda: len(calls) >= 2, "a waiter taking the slow load over")
        # The drivers' waits run on real time: 2.5 bounds more, and no further takeover
        # (every waiter computing as its bound passed made 8 calls; a takeover per bound, 4).
        time.sleep(0.5)
        assert len(calls) == 2, f"{len(calls)} calls for 8 callers"
        gate.set()
        for t in threads:
            t.join(BOUND)
    finally:
        gate.set()
        cache.close()


def test_a_solo_load_serves_the_stale_copy_when_its_function_fails(namespace: str) -> None:
    """A call that must load on its own (here: re-entrant) keeps the fail-safe of any load:
    within ``stale_ttl`` the last value answers when the function raises."""
    clock = Clock(frozen=True)
    cache = TieredCache(namespace=namespace, clock=clock)
    depth = [0]

    @tiered(cache, name="solo-stale", ttl=10, l1_ttl=10, stale_ttl=60)
    def price(x: int) -> int:
        depth[0] += 1
        if depth[0] == 1:
            return 1
        if depth[0] == 2:
            return price(x) + 100  # re-enters its own key: the inner call loads solo...
        raise RuntimeError("the database is down")  # ...and its function fails

    try:
        assert price(1) == 1
        clock.advance(11)  # expired, within stale_ttl
        assert finishes(lambda: price(1)) == 101  # the inner call answered with the stale 1
    finally:
        cache.close()

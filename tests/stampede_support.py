"""What the stampede tests share: a clock to jump over TTLs, gates that hold a load, a count
of callers provably waiting on a flight, crowds of concurrent callers (threads or tasks)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

WAIT = 5.0  # seconds any test waits for another thread or task before failing (never reached when green)


class Clock:
    """Real monotonic time plus an offset the test moves forward: timeouts elapse as they
    would, and TTLs are jumped over without sleeping."""

    def __init__(self) -> None:
        self.offset = 10_000.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


class Gate:
    """Holds a sync or async function until the test opens it (every gate opens at teardown,
    so no worker thread stays stuck)."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def open(self) -> None:
        self.event.set()

    def block(self) -> None:
        assert self.event.wait(WAIT), "the gate was never opened"

    async def ablock(self) -> None:
        deadline = time.monotonic() + WAIT
        while not self.event.is_set():
            assert time.monotonic() < deadline, "the gate was never opened"
            await asyncio.sleep(0.002)


class Joined:
    """Counts callers that wait on a flight (instead of loading), so a function can hold its
    load until a known number of callers are provably waiting for it."""

    def __init__(self) -> None:
        self.count = 0
        self._cond = threading.Condition()

    def bump(self) -> None:
        with self._cond:
            self.count += 1
            self._cond.notify_all()

    def reach(self, n: int) -> Mark:
        return Mark(self, n)

    def block(self, n: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.count >= n, WAIT), f"{self.count} of {n} callers joined"

    async def ablock(self, n: int) -> None:
        deadline = time.monotonic() + WAIT
        while self.count < n:  # bumped on this loop's thread by the tasks that join
            assert time.monotonic() < deadline, f"{self.count} of {n} callers joined"
            await asyncio.sleep(0)


class Mark:
    """Something a call waits for: ``n`` callers joined."""

    def __init__(self, joined: Joined, n: int) -> None:
        self.joined, self.n = joined, n

    def block(self) -> None:
        self.joined.block(self.n)

    async def ablock(self) -> None:
        await self.joined.ablock(self.n)


class Boom(Exception):
    pass


class AsyncOnly:
    """What Loader needs of the ``mode`` fixture, for scenarios that only exist in asyncio."""

    is_async = True


def crowd(mode: Any, n: int, call: Callable[[], Any]) -> tuple[list[Any], float]:
    """``n`` concurrent ``call()``s (threads, or tasks in async mode): results or exceptions,
    and the seconds until the last returned."""
    started = time.monotonic()
    if mode.is_async:

        async def gather() -> list[Any]:
            return await asyncio.wait_for(asyncio.gather(*(call() for _ in range(n)), return_exceptions=True), WAIT)

        results: list[Any] = mode.run(gather())
        return results, time.monotonic() - started
    results = [None] * n
    go = threading.Event()

    def run(i: int) -> None:
        go.wait()
        try:
            results[i] = call()
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    started = time.monotonic()
    go.set()
    for t in threads:
        t.join(WAIT)
    assert not any(t.is_alive() for t in threads), "a caller is still waiting"
    return results, time.monotonic() - started


def eventually(mode: Any, predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Wait until ``predicate()`` holds, running the test's event loop in async mode (where
    background loads and refreshes are tasks)."""

    async def apoll() -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.002)
        return True

    if mode.is_async:
        ok = mode.run(apoll())
    else:
        deadline = time.monotonic() + timeout
        while not (ok := predicate()) and time.monotonic() < deadline:
            time.sleep(0.002)
    if not ok:
        pytest.fail(f"timed out waiting for {what}")

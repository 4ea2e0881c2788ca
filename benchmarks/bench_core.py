#!/usr/bin/env python3
"""Core-path benchmark: tiercache's L1 hit, L2 hit and miss against baselines measured in the same run.

    /work/venv/bin/python benchmarks/bench_core.py            # full run (about a minute)
    /work/venv/bin/python benchmarks/bench_core.py --quick    # smoke test (a few seconds)
    /work/venv/bin/python benchmarks/bench_core.py --json out.json

The script starts its own throwaway ``redis-server`` on a free loopback port (never the one on
6379) and stops it by pid at the end, also on Ctrl-C, SIGTERM or an exception. Every figure is
the median of ``--repeats`` rounds; in each round every case of a section times one batch of
calls with ``time.perf_counter_ns`` and the garbage collector disabled, the cases taken in
turn (forward, then backward), so a noisy neighbour slows all of them alike. Ratios are medians
of per-round ratios against a baseline measured in the same round. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import functools
import gc
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # measure the working tree's tiercache, installed or not

import msgpack  # noqa: E402
import redis  # noqa: E402
import redis.asyncio  # noqa: E402

import tiercache  # noqa: E402
from tiercache import TieredCache, tiered  # noqa: E402

HOT = list(range(64))  # the arguments of the L1-hit section: 64 distinct warm entries
HOT_L2 = list(range(8))  # the arguments of the L2-hit section
TTL = 300
MISS_TTL = 60  # the miss section writes a new key per call: let them expire soon

# Per-section time of one sample, in ms: (full, quick).
SAMPLE_MS = {"l1": (50, 8), "l2": (150, 25), "miss": (200, 30)}

Runner = Callable[[int], int]  # runs n calls, returns the elapsed ns


# -- the throwaway redis-server --------------------------------------------------------------


def _free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port != 6379:
            return port


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the benchmark dies (even by SIGKILL). Linux only."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def exit_on_signals() -> None:
    """SIGTERM and SIGHUP raise SystemExit, so the benchmark's ``finally`` stops its server."""

    def on_signal(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, on_signal)


class RedisServer:
    """A redis-server owned by this process: a free loopback port, no persistence, stopped by pid."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir = tempfile.mkdtemp(prefix="tiercache-bench-")
        self.version = "?"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log_path = os.path.join(self.dir, "redis.log")
        for _ in range(5):
            self.port = _free_port()
            with open(log_path, "wb") as log:
                self.proc = subprocess.Popen(
                    [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", self.dir, "--daemonize", "no", "--loglevel", "warning",
                     "--protected-mode", "no"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,  # Ctrl-C reaches us only; we stop the server ourselves
                    preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509 - no threads yet
                )  # fmt: skip
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5)
                    if client.ping():
                        self.version = str(client.info("server").get("redis_version", "?"))
                        client.close()
                        return
                except (redis.ConnectionError, redis.TimeoutError, OSError):
                    time.sleep(0.02)
            self.stop()  # port taken between probe and bind, or too slow: try another port
        with open(log_path, errors="replace") as log:
            raise RuntimeError(f"redis-server did not start: {log.read()[-2000:]}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()  # SIGTERM to this pid only; --save "" so nothing is written
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- measurement -----------------------------------------------------------------------------


@dataclass
class Case:
    key: str  # stable id, used by --json and as a baseline reference
    section: str  # "l1", "l2", "miss"
    group: str  # the heading the row is printed under
    label: str
    run: Runner | None
    baseline: str | None = None  # ratios are taken against this case's key
    floor: str | None = None  # "over floor" = median minus this case's median
    note: str = ""
    skipped: str = ""
    n: int = 0
    samples: list[float] = field(default_factory=list)  # ns per call, one per round

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def _timed(run: Runner, n: int) -> float:
    """ns per call of one batch of ``n`` calls, timed with the garbage collector off."""
    gc.collect()
    gc.disable()
    try:
        return run(n) / n
    finally:
        gc.enable()


def _calibrate(case: Case, batch_ns: float, start_n: int) -> None:
    """Find the batch size that takes about ``batch_ns`` (these runs also warm the case up)."""
    assert case.run is not None
    n = start_n
    while True:
        per_call = max(_timed(case.run, n), 0.001)
        if per_call * n >= batch_ns / 5:
            case.n = max(1, round(batch_ns / per_call))
            return
        n = min(n * 10, max(n * 2, round(batch_ns / per_call / 2)))


def measure(cases: list[Case], repeats: int, sample_ms: float, parts: int, start_n: int) -> None:
    """``repeats`` rounds. In a round every case runs ``parts`` batches (``sample_ms`` in all),
    interleaved with the other cases' batches; its sample for the round is its fastest batch.

    Interference from other processes only ever adds time, so the fastest batch is the least
    disturbed one, and interleaving gives every case the same chances at a quiet moment.
    Batches alternate direction (forward, backward), so each case stays next to the baseline
    listed just before it and no case is always first."""
    live = [c for c in cases if c.run is not None and not c.skipped]
    for c in live:
        _calibrate(c, sample_ms * 1e6 / parts, start_n)
    for r in range(repeats):
        best = dict.fromkeys((c.key for c in live), float("inf"))
        gc.collect()
        gc.disable()
        try:
            for p in range(parts):
                for c in live if (r * parts + p) % 2 == 0 else live[::-1]:
                    assert c.run is not None
                    best[c.key] = min(best[c.key], c.run(c.n) / c.n)
        finally:
            gc.enable()
        for c in live:
            c.samples.append(best[c.key])
        print(f"  round {r + 1}/{repeats} done", file=sys.stderr, flush=True)


def ratios(case: Case, by_key: dict[str, Case]) -> list[float]:
    """Per-round ratios against the baseline (both were sampled in the same round)."""
    base = by_key.get(case.baseline or "")
    if base is None or not base.samples or not case.samples:
        return []
    return [a / b for a, b in zip(case.samples, base.samples, strict=True)]


# -- helpers to build runners ----------------------------------------------------------------


def _cycle(values: list[Any], n: int) -> list[Any]:
    return (values * (n // len(values) + 1))[:n]


def sync_runner(fn: Callable[[Any], Any], values: list[Any]) -> Runner:
    def run(n: int) -> int:
        seq = _cycle(values, n)
        f = fn
        t0 = time.perf_counter_ns()
        for a in seq:
            f(a)
        return time.perf_counter_ns() - t0

    return run


def sync_fresh_runner(fn: Callable[[Any], Any], counter: list[int]) -> Runner:
    """Every call gets an argument never used before (a cold key each time)."""

    def run(n: int) -> int:
        start = counter[0]
        counter[0] += n
        seq = range(start, start + n)
        f = fn
        t0 = time.perf_counter_ns()
        for a in seq:
            f(a)
        return time.perf_counter_ns() - t0

    return run


def async_runner(
    loop: asyncio.AbstractEventLoop, fn: Callable[[Any], Coroutine[Any, Any, Any]], values: list[Any]
) -> Runner:
    async def batch(seq: list[Any]) -> int:
        f = fn
        t0 = time.perf_counter_ns()
        for a in seq:
            await f(a)
        return time.perf_counter_ns() - t0

    def run(n: int) -> int:
        return loop.run_until_complete(batch(_cycle(values, n)))

    return run


def async_fresh_runner(
    loop: asyncio.AbstractEventLoop, fn: Callable[[Any], Coroutine[Any, Any, Any]], counter: list[int]
) -> Runner:
    async def batch(seq: Iterable[int]) -> int:
        f = fn
        t0 = time.perf_counter_ns()
        for a in seq:
            await f(a)
        return time.perf_counter_ns() - t0

    def run(n: int) -> int:
        start = counter[0]
        counter[0] += n
        return loop.run_until_complete(batch(range(start, start + n)))

    return run


def _skip(key: str, section: str, group: str, label: str, why: str, **kw: Any) -> Case:
    return Case(key, section, group, label, None, skipped=why, **kw)


class Env:
    """What the sections share: the server, the event loop, and what to close at the end."""

    def __init__(self, server: RedisServer) -> None:
        self.server = server
        self.loop = asyncio.new_event_loop()
        self.sync_closers: list[Callable[[], Any]] = []
        self.async_closers: list[Callable[[], Coroutine[Any, Any, Any]]] = []
        self.checks: list[tuple[TieredCache, str, Any, tuple[str, ...]]] = []

    def tiered_cache(self, **kwargs: Any) -> TieredCache:
        """A TieredCache on the benchmark's server, closed at the end, its L1 ready to take entries."""
        cache = TieredCache(self.server.url, **kwargs)
        self.async_closers.append(cache.aclose)  # aclose() also closes the sync side
        # A coherent cache keeps L1 off until its invalidation subscriber is subscribed: fills
        # made before that would not enter L1, and "L1 hits" would be L2 reads.
        ready = getattr(cache, "ready", None)
        if ready is not None and not ready(10.0):
            raise RuntimeError(f"tiercache {kwargs.get('namespace')}: the invalidation subscriber did not connect")
        return cache

    def expect(self, cache: TieredCache, what: str, **zero: Any) -> None:
        """After the section is measured, check that tiercache's counters did not move in ``zero``
        (e.g. no L2 reads in the L1 section), so every timed call took the path its row names."""
        before = cache.stats()
        self.checks.append((cache, what, before, tuple(zero)))

    def run_checks(self) -> list[str]:
        problems = []
        for cache, what, before, fields in self.checks:
            after = cache.stats()
            for name in fields:
                moved = getattr(after, name) - getattr(before, name)
                if moved:
                    problems.append(f"{what}: {name} moved by {moved} while measuring (expected 0)")
        self.checks.clear()
        return problems

    def aio(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        for closer in self.async_closers:
            try:
                self.aio(closer())
            except Exception as exc:
                print(f"  (closing: {exc!r})", file=sys.stderr)
        for sync_closer in self.sync_closers:
            try:
                sync_closer()
            except Exception as exc:
                print(f"  (closing: {exc!r})", file=sys.stderr)
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


# -- section 1: L1 hits ----------------------------------------------------------------------


def section_l1(env: Env) -> list[Case]:
    S, A = "1a. L1 hit, sync (ns per call)", "1b. L1 hit, async (ns per await, inside a running loop)"
    cases: list[Case] = []
    ttl_base, plain_s, plain_a = "l1.sync.cachetools_ttl", "l1.sync.plain", "l1.async.plain"

    def plain(x: int) -> int:
        return x

    cache = env.tiered_cache(namespace="bench.l1", ttl=TTL)

    @tiered(cache, name="l1_sync")
    def t_sync(x: int) -> int:
        return x

    for a in HOT:
        t_sync(a)
    tiered_case = Case(
        "l1.sync.tiered", "l1", S, "tiercache @tiered (sync)", sync_runner(t_sync, HOT), ttl_base, plain_s
    )

    cases.append(Case(plain_s, "l1", S, "undecorated function", sync_runner(plain, HOT), ttl_base, plain_s))
    lru = functools.lru_cache(maxsize=1024)(plain)
    cases.append(Case("l1.sync.lru_cache", "l1", S, "functools.lru_cache", sync_runner(lru, HOT), ttl_base, plain_s))
    try:
        import cachetools

        ttl_fn = cachetools.cached(cachetools.TTLCache(maxsize=1024, ttl=TTL))(plain)
        lru_fn = cachetools.cached(cachetools.LRUCache(maxsize=1024))(plain)
        # tiercache between the two cachetools rows: each target ratio pairs neighbours
        cases.append(
            Case(ttl_base, "l1", S, "cachetools.cached(TTLCache)", sync_runner(ttl_fn, HOT), ttl_base, plain_s)
        )
        cases.append(tiered_case)
        lru_label = "cachetools.cached(LRUCache)"
        cases.append(Case("l1.sync.cachetools_lru", "l1", S, lru_label, sync_runner(lru_fn, HOT), ttl_base, plain_s))
    except ImportError:
        cases.append(_skip(ttl_base, "l1", S, "cachetools.cached(TTLCache)", "pip install cachetools"))
        cases.append(tiered_case)

    # async
    async def aplain(x: int) -> int:
        return x

    loop = env.loop
    cases.append(Case(plain_a, "l1", A, "undecorated async def", async_runner(loop, aplain, HOT), plain_a, plain_a))

    @tiered(cache, name="l1_async")
    async def t_async(x: int) -> int:
        return x

    env.aio(_fill(t_async, HOT))
    env.expect(cache, "L1 section", l2_hits=0, misses=0)
    cases.append(
        Case(
            "l1.async.tiered", "l1", A, "tiercache @tiered (async)", async_runner(loop, t_async, HOT), plain_a, plain_a
        )
    )

    try:
        from async_lru import alru_cache

        alru = alru_cache(maxsize=1024)(aplain)
        env.aio(_fill(alru, HOT))
        cases.append(
            Case("l1.async.async_lru", "l1", A, "async_lru.alru_cache", async_runner(loop, alru, HOT), plain_a, plain_a)
        )
    except ImportError:
        cases.append(_skip("l1.async.async_lru", "l1", A, "async_lru.alru_cache", "pip install async-lru"))

    try:
        from aiocache import cached as aio_cached

        for key, label, kw in (
            ("l1.async.aiocache", "aiocache @cached (memory)", {}),
            ("l1.async.aiocache_nt", "aiocache @cached (memory, timeout=None)", {"timeout": None}),
        ):
            fn = aio_cached(ttl=TTL, namespace=key, **kw)(aplain)
            env.aio(_fill(fn, HOT))
            note = "default timeout=5 wraps every get in asyncio.wait_for" if not kw else ""
            cases.append(Case(key, "l1", A, label, async_runner(loop, fn, HOT), plain_a, plain_a, note=note))
    except ImportError:
        cases.append(_skip("l1.async.aiocache", "l1", A, "aiocache @cached (memory)", "pip install aiocache"))

    try:
        from cashews import Cache as CashewsCache

        cw = CashewsCache()
        cw.setup("mem://", size=10_000)
        env.aio(cw.init())
        env.async_closers.append(cw.close)
        fn = cw(ttl=TTL, prefix="l1")(aplain)
        env.aio(_fill(fn, HOT))
        cases.append(
            Case("l1.async.cashews", "l1", A, "cashews @cache (mem://)", async_runner(loop, fn, HOT), plain_a, plain_a)
        )
    except ImportError:
        cases.append(_skip("l1.async.cashews", "l1", A, "cashews @cache (mem://)", "pip install cashews"))
    return cases


# -- section 2: L2 hits ----------------------------------------------------------------------


def section_l2(env: Env) -> list[Case]:
    cases: list[Case] = []
    port = env.server.port
    raw = redis.Redis(host="127.0.0.1", port=port)
    araw = redis.asyncio.Redis(host="127.0.0.1", port=port)
    env.sync_closers.append(raw.close)
    env.async_closers.append(araw.aclose)
    # l1_maxsize=0 turns L1 off: every call is an L2 read (SET NX GET + PTTL pipelined, decode).
    cache = env.tiered_cache(namespace="bench.l2", ttl=TTL, l1_maxsize=0)

    for size_label, size in (("100 B", 100), ("10 KB", 10 * 1024)):
        cases += _l2_cases(env, cache, raw, araw, size_label, size)
    env.expect(cache, "L2 section", l1_hits=0, misses=0, backend_errors=0, codec_errors=0)
    return cases


def _l2_cases(
    env: Env, cache: TieredCache, raw: redis.Redis, araw: redis.asyncio.Redis, size_label: str, size: int
) -> list[Case]:
    cases: list[Case] = []
    port, loop = env.server.port, env.loop
    tag = "100b" if size == 100 else "10kb"
    S = f"2. L2 hit, {size_label} value (µs per call; L1 off, every call reads Redis)"
    payload = os.urandom(size)  # incompressible: the same bytes cross the wire for everyone
    base_s, base_a = f"l2.{tag}.raw_sync", f"l2.{tag}.raw_async"

    @tiered(cache, name=f"l2_{tag}_sync")
    def t_sync(x: int) -> bytes:
        return payload

    @tiered(cache, name=f"l2_{tag}_async")
    async def t_async(x: int) -> bytes:
        return payload

    for a in HOT_L2:
        t_sync(a)
    env.aio(_fill(t_async, HOT_L2))
    rkeys = [t_sync.key(a) for a in HOT_L2]  # raw GET reads the very envelopes tiercache reads
    assert all(raw.exists(k) for k in rkeys), "tiercache did not store its L2 entries"
    assert t_sync(0) == payload and env.aio(t_async(0)) == payload

    cases.append(Case(base_s, "l2", S, "redis-py Redis.get (sync, raw)", sync_runner(raw.get, rkeys), base_s))
    cases.append(
        Case(f"l2.{tag}.tiered_sync", "l2", S, "tiercache @tiered (sync)", sync_runner(t_sync, HOT_L2), base_s)
    )
    cases.append(
        Case(base_a, "l2", S, "redis.asyncio Redis.get (async, raw)", async_runner(loop, araw.get, rkeys), base_a)
    )
    cases.append(
        Case(
            f"l2.{tag}.tiered_async", "l2", S, "tiercache @tiered (async)", async_runner(loop, t_async, HOT_L2), base_a
        )
    )

    try:
        from dogpile.cache import make_region

        region = make_region().configure(
            "dogpile.cache.redis",
            expiration_time=TTL,
            arguments={"host": "127.0.0.1", "port": port, "db": 0, "redis_expiration_time": TTL * 2},
        )

        @region.cache_on_arguments(namespace=f"l2_{tag}")
        def dp(x: int) -> bytes:
            return payload

        for a in HOT_L2:
            dp(a)
        cases.append(Case(f"l2.{tag}.dogpile", "l2", S, "dogpile.cache (redis, sync)", sync_runner(dp, HOT_L2), base_s))
    except ImportError:
        cases.append(_skip(f"l2.{tag}.dogpile", "l2", S, "dogpile.cache (redis, sync)", "pip install dogpile.cache"))

    try:
        from aiocache import Cache as AioCache
        from aiocache import cached as aio_cached
        from aiocache.serializers import PickleSerializer

        aio_fn = aio_cached(
            ttl=TTL, cache=AioCache.REDIS, endpoint="127.0.0.1", port=port, namespace=f"l2_{tag}",
            serializer=PickleSerializer(),
        )(_const_async(payload))  # fmt: skip
        env.async_closers.append(aio_fn.cache.close)
        env.aio(_fill(aio_fn, HOT_L2))
        cases.append(
            Case(
                f"l2.{tag}.aiocache",
                "l2",
                S,
                "aiocache @cached (RedisCache, async)",
                async_runner(loop, aio_fn, HOT_L2),
                base_a,
                note="default timeout=5: asyncio.wait_for per get",
            )
        )
    except ImportError:
        cases.append(_skip(f"l2.{tag}.aiocache", "l2", S, "aiocache @cached (RedisCache)", "pip install aiocache"))

    try:
        from cashews import Cache as CashewsCache

        cw = CashewsCache()
        cw.setup(f"redis://127.0.0.1:{port}/0", client_side=False)
        env.aio(cw.init())
        env.async_closers.append(cw.close)
        cw_fn = cw(ttl=TTL, prefix=f"l2_{tag}")(_const_async(payload))
        env.aio(_fill(cw_fn, HOT_L2))
        cases.append(
            Case(
                f"l2.{tag}.cashews",
                "l2",
                S,
                "cashews @cache (redis://, async)",
                async_runner(loop, cw_fn, HOT_L2),
                base_a,
            )
        )
    except ImportError:
        cases.append(_skip(f"l2.{tag}.cashews", "l2", S, "cashews @cache (redis://)", "pip install cashews"))
    return cases


def _const_async(payload: bytes) -> Callable[[int], Coroutine[Any, Any, bytes]]:
    async def value(x: int) -> bytes:
        return payload

    return value


async def _fill(fn: Callable[[int], Coroutine[Any, Any, Any]], values: list[int]) -> None:
    for a in values:
        await fn(a)


# -- section 3: misses -----------------------------------------------------------------------


def section_miss(env: Env) -> list[Case]:
    S = "3. Miss: a cold key on every call, trivial function (µs per call)"
    port, loop = env.server.port, env.loop
    cases: list[Case] = []
    raw = redis.Redis(host="127.0.0.1", port=port)
    araw = redis.asyncio.Redis(host="127.0.0.1", port=port)
    env.sync_closers.append(raw.close)
    env.async_closers.append(araw.aclose)
    cache = env.tiered_cache(namespace="bench.miss", ttl=MISS_TTL)  # L1 on, as in production
    packb, unpackb = msgpack.packb, msgpack.unpackb

    def compute(x: int) -> int:
        return x

    def aside(x: int) -> Any:
        k = f"bench:aside:s:{x}"
        v = raw.get(k)
        if v is None:
            v = compute(x)
            raw.set(k, packb(v), ex=MISS_TTL)
            return v
        return unpackb(v)

    async def aaside(x: int) -> Any:
        k = f"bench:aside:a:{x}"
        v = await araw.get(k)
        if v is None:
            v = compute(x)
            await araw.set(k, packb(v), ex=MISS_TTL)
            return v
        return unpackb(v)

    @tiered(cache, ttl=MISS_TTL, name="miss_sync")
    def t_sync(x: int) -> int:
        return x

    @tiered(cache, ttl=MISS_TTL, name="miss_async")
    async def t_async(x: int) -> int:
        return x

    env.expect(cache, "miss section", l1_hits=0, l2_hits=0, backend_errors=0)
    # Each runner has its own counter: its arguments (so its keys) are never seen before.
    base_s, base_a = "miss.aside_sync", "miss.aside_async"
    cases.append(
        Case(
            base_s, "miss", S, "hand-written cache-aside (sync: GET, SET EX)", sync_fresh_runner(aside, [10**9]), base_s
        )
    )
    cases.append(
        Case("miss.tiered_sync", "miss", S, "tiercache @tiered (sync)", sync_fresh_runner(t_sync, [2 * 10**9]), base_s)
    )
    cases.append(
        Case(
            base_a,
            "miss",
            S,
            "hand-written cache-aside (async: GET, SET EX)",
            async_fresh_runner(loop, aaside, [3 * 10**9]),
            base_a,
        )
    )
    cases.append(
        Case(
            "miss.tiered_async",
            "miss",
            S,
            "tiercache @tiered (async)",
            async_fresh_runner(loop, t_async, [4 * 10**9]),
            base_a,
        )
    )
    return cases


# -- report ----------------------------------------------------------------------------------


@dataclass
class Target:
    text: str
    case: str
    limit: float
    absolute: bool = False  # limit is ns per call rather than a ratio
    against: str | None = None  # ratio against this case instead of the case's own baseline


TARGETS = [
    Target("tiercache sync L1 hit <= cachetools.cached(TTLCache)", "l1.sync.tiered", 1.0),
    Target(
        "tiercache sync L1 hit <= cachetools.cached(LRUCache)", "l1.sync.tiered", 1.0, against="l1.sync.cachetools_lru"
    ),
    Target("tiercache async L1 hit < 1 µs per await", "l1.async.tiered", 1000.0, absolute=True),
    Target("tiercache sync L2 hit, 100 B <= 1.2x raw GET", "l2.100b.tiered_sync", 1.2),
    Target("tiercache async L2 hit, 100 B <= 1.2x raw GET", "l2.100b.tiered_async", 1.2),
    Target("tiercache sync L2 hit, 10 KB <= 1.2x raw GET", "l2.10kb.tiered_sync", 1.2),
    Target("tiercache async L2 hit, 10 KB <= 1.2x raw GET", "l2.10kb.tiered_async", 1.2),
    Target("tiercache sync miss <= 1.25x cache-aside", "miss.tiered_sync", 1.25),
    Target("tiercache async miss <= 1.25x cache-aside", "miss.tiered_async", 1.25),
]


def _fmt_time(ns: float, section: str) -> str:
    return f"{ns:,.0f} ns" if section == "l1" else f"{ns / 1000:,.1f} µs"


def _fmt_delta(ns: float, section: str) -> str:
    return f"{ns:+,.0f} ns" if section == "l1" else f"{ns / 1000:+,.1f} µs"


def report(cases: list[Case]) -> list[dict[str, Any]]:
    by_key = {c.key: c for c in cases}
    group = None
    header = f"  {'case':<46} {'median':>11} {'spread':>13} {'over floor':>12}  {'ratio to baseline [min-max]':<30}"
    for c in cases:
        if c.group != group:
            group = c.group
            print(f"\n{group}\n{header}\n  {'-' * (len(header) - 2)}")
        if c.skipped or not c.samples:
            print(f"  {c.label:<46} {'skipped: ' + (c.skipped or 'not run')}")
            continue
        med = c.median
        spread = f"-{(med - min(c.samples)) / med:.0%}/+{(max(c.samples) - med) / med:.0%}"
        floor = by_key.get(c.floor or "")
        over = _fmt_delta(med - floor.median, c.section) if floor and floor.samples and floor is not c else ""
        rs = ratios(c, by_key)
        if c.baseline == c.key:
            ratio = "baseline"
        elif rs:
            ratio = f"{statistics.median(rs):.2f}x  [{min(rs):.2f}-{max(rs):.2f}]  vs {by_key[c.baseline or ''].label}"
        else:
            ratio = ""
        print(f"  {c.label:<46} {_fmt_time(med, c.section):>11} {spread:>13} {over:>12}  {ratio}")
        if c.note:
            print(f"  {'':<46}   ({c.note})")

    print("\nTargets")
    verdicts: list[dict[str, Any]] = []
    for t in TARGETS:
        c = by_key.get(t.case)
        if c is None or not c.samples:
            continue
        if t.absolute:
            value = c.median
            met = value < t.limit
            shown = f"{value:,.0f} ns"
        else:
            base_key = t.against or c.baseline or ""
            base = by_key.get(base_key)
            if base is None or not base.samples:
                continue
            rs = [a / b for a, b in zip(c.samples, base.samples, strict=True)]
            value = statistics.median(rs)
            met = value <= t.limit
            shown = f"{value:.2f}x (rounds {min(rs):.2f}-{max(rs):.2f})"
        print(f"  [{'MET   ' if met else 'MISSED'}] {t.text:<55} {shown}")
        verdicts.append({"target": t.text, "case": t.case, "value": value, "limit": t.limit, "met": met})
    return verdicts


def write_json(
    path: Path, meta: dict[str, Any], cases: list[Case], verdicts: list[dict[str, Any]], problems: list[str]
) -> None:
    by_key = {c.key: c for c in cases}
    rows = []
    for c in cases:
        rs = ratios(c, by_key)
        rows.append(
            {
                "key": c.key,
                "section": c.section,
                "group": c.group,
                "label": c.label,
                "baseline": c.baseline,
                "skipped": c.skipped or None,
                "calls_per_batch": c.n,
                "ns_per_call_rounds": c.samples,
                "ns_per_call_median": c.median if c.samples else None,
                "ratio_rounds": rs,
                "ratio_median": statistics.median(rs) if rs else None,
            }
        )
    doc = {"meta": meta, "cases": rows, "targets": verdicts, "check_failures": problems}
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")


def environment(server: RedisServer | None) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    def ver(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    try:
        import hiredis

        hiredis_ver = getattr(hiredis, "__version__", "present")
    except ImportError:
        hiredis_ver = "absent"
    try:
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            check=False,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return {
        "command": shlex.join([sys.executable, *sys.argv]),
        "python": f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg": _loadavg(),
        "redis_server": f"{server.version} ({server.binary}, 127.0.0.1:{server.port})" if server else "not started",
        "redis_py": redis.__version__,
        "hiredis": f"{hiredis_ver}, used by redis-py: {getattr(redis.utils, 'HIREDIS_AVAILABLE', '?')}",
        "tiercache": f"{tiercache.__version__} ({ROOT}{', git ' + rev if rev else ''})",
        "peers": {d: ver(d) for d in ("cachetools", "async-lru", "aiocache", "cashews", "dogpile.cache")},
    }


def _loadavg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short samples and 3 rounds: a smoke test (~15 s)")
    parser.add_argument("--repeats", type=int, help="rounds per case (default 9, --quick 3)")
    parser.add_argument(
        "--parts", type=int, default=5, help="batches per case per round; the fastest is the round's sample (default 5)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    parser.add_argument("--only", default="l1,l2,miss", help="comma-separated sections to run: l1,l2,miss")
    parser.add_argument(
        "--redis-server", default=os.environ.get("TIERCACHE_REDIS_SERVER") or shutil.which("redis-server")
    )
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 9)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    if unknown := set(sections) - set(SAMPLE_MS):
        parser.error(f"unknown sections: {sorted(unknown)}")
    if not args.redis_server:
        parser.error("redis-server not found on PATH (apt-get install redis-server), or pass --redis-server PATH")

    exit_on_signals()

    server = RedisServer(args.redis_server)
    atexit.register(server.cleanup)  # a second line of defence; cleanup is idempotent
    env: Env | None = None
    t_start = time.monotonic()
    try:
        server.start()
        meta = environment(server)
        print("tiercache core benchmark")
        for k, v in meta.items():
            print(f"  {k + ':':<14} {v}")
        kind = "--quick" if args.quick else "full"
        print(f"  {'method:':<14} {kind} run; {repeats} rounds per case, each the fastest of {args.parts} batches")
        load1 = meta["loadavg"][0] if meta["loadavg"] else 0.0
        if load1 > (os.cpu_count() or 1) / 2:
            print(f"  WARNING: load average {load1:.1f} on {os.cpu_count()} CPUs: other work is running, expect noise")
        env = Env(server)
        builders = {"l1": (section_l1, 1000), "l2": (section_l2, 20), "miss": (section_miss, 20)}
        cases: list[Case] = []
        problems: list[str] = []
        for name in sections:
            build, start_n = builders[name]
            print(f"[{name}] setting up and measuring ...", file=sys.stderr, flush=True)
            section_cases = build(env)
            full_ms, quick_ms = SAMPLE_MS[name]
            measure(section_cases, repeats, quick_ms if args.quick else full_ms, args.parts, start_n)
            problems += env.run_checks()
            cases += section_cases
        verdicts = report(cases)
        for problem in problems:
            print(f"  CHECK FAILED: {problem}")
        elapsed = time.monotonic() - t_start
        load = _loadavg()
        print(f"\nwall time {elapsed:.0f} s; load average at start {meta['loadavg']}, at end {load}")
        if args.json:
            meta.update(repeats=repeats, parts=args.parts, quick=args.quick, wall_s=elapsed, loadavg_end=load)
            write_json(Path(args.json), meta, cases, verdicts, problems)
            print(f"wrote {args.json}")
    finally:
        if env is not None:
            env.close()
        server.cleanup()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the server was stopped on the way out (main's finally)
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)

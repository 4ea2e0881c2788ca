#!/usr/bin/env python3
"""Core-path benchmark: tiercache's L1 hit, L2 hit and miss against baselines measured in the same run.

    .venv/bin/python benchmarks/bench_core.py            # full run (about a minute)
    .venv/bin/python benchmarks/bench_core.py --quick    # smoke test (a few seconds)
    .venv/bin/python benchmarks/bench_core.py --json out.json

The harness (harness.py) starts a throwaway ``redis-server`` and prints the environment. Every
figure is the median of ``--repeats`` interleaved rounds (harness.measure); ratios are medians of
per-round ratios against a baseline measured in the same round. See benchmarks/README.md.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sys
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

import harness
import msgpack
import redis
import redis.asyncio
from harness import Case, Runner, measure, ratios

from tiercache import TieredCache, tiered

HOT = list(range(64))  # the arguments of the L1-hit section: 64 distinct warm entries
HOT_L2 = list(range(8))  # the arguments of the L2-hit section
TTL = 300
MISS_TTL = 60  # the miss section writes a new key per call: let them expire soon

# Per-section time of one sample, in ms: (full, quick).
SAMPLE_MS = {"l1": (50, 8), "l2": (150, 25), "miss": (200, 30)}


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


class Env:
    """What the sections share: the server, the event loop, and what to close at the end."""

    def __init__(self, server: harness.RedisServer) -> None:
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
        cases.append(harness.skipped(ttl_base, "l1", S, "cachetools.cached(TTLCache)", "pip install cachetools"))
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
        cases.append(harness.skipped("l1.async.async_lru", "l1", A, "async_lru.alru_cache", "pip install async-lru"))

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
        cases.append(harness.skipped("l1.async.aiocache", "l1", A, "aiocache @cached (memory)", "pip install aiocache"))

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
        cases.append(harness.skipped("l1.async.cashews", "l1", A, "cashews @cache (mem://)", "pip install cashews"))
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
        cases.append(
            harness.skipped(f"l2.{tag}.dogpile", "l2", S, "dogpile.cache (redis, sync)", "pip install dogpile.cache")
        )

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
        cases.append(
            harness.skipped(f"l2.{tag}.aiocache", "l2", S, "aiocache @cached (RedisCache)", "pip install aiocache")
        )

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
        cases.append(harness.skipped(f"l2.{tag}.cashews", "l2", S, "cashews @cache (redis://)", "pip install cashews"))
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


def report(cases: list[Case]) -> None:
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
            shown = "baseline"
        elif rs:
            shown = f"{rs}  vs {by_key[c.baseline or ''].label}"
        else:
            shown = ""
        print(f"  {c.label:<46} {_fmt_time(med, c.section):>11} {spread:>13} {over:>12}  {shown}")
        if c.note:
            print(f"  {'':<46}   ({c.note})")


def check_targets(cases: list[Case]) -> list[dict[str, Any]]:
    by_key = {c.key: c for c in cases}
    print("\nTargets")
    verdicts: list[dict[str, Any]] = []
    for t in TARGETS:
        case = by_key.get(t.case)
        if case is None or not case.samples:
            continue
        if t.absolute:
            value = case.median
            met = value < t.limit
            shown = f"{value:,.0f} ns"
        else:
            rs = ratios(case, by_key, against=t.against)
            if not rs:
                continue
            value = rs.median
            met = value <= t.limit
            shown = f"{value:.2f}x (rounds {min(rs.rounds):.2f}-{max(rs.rounds):.2f})"
        verdicts.append(harness.verdict(t.text, met, shown, value, case=t.case, limit=t.limit))
    return verdicts


def json_doc(meta: dict[str, Any], cases: list[Case], verdicts: list[dict[str, Any]], problems: list[str]) -> Any:
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
                "ratio_rounds": rs.rounds,
                "ratio_median": rs.median if rs else None,
            }
        )
    return {"meta": meta, "cases": rows, "targets": verdicts, "check_failures": problems}


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(
        __doc__,
        quick="short samples and 3 rounds: a smoke test (~15 s)",
        repeats="rounds per case (default 9, --quick 3)",
    )
    parser.add_argument(
        "--parts", type=int, default=5, help="batches per case per round; the fastest is the round's sample (default 5)"
    )
    parser.add_argument("--only", default="l1,l2,miss", help="comma-separated sections to run: l1,l2,miss")
    args = harness.parse(parser, argv)
    repeats = args.repeats or (3 if args.quick else 9)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    if unknown := set(sections) - set(SAMPLE_MS):
        parser.error(f"unknown sections: {sorted(unknown)}")

    t_start = time.monotonic()
    env: Env | None = None
    with harness.redis_server(args.redis_server) as server:
        try:
            meta = harness.environment(server)
            kind = "--quick" if args.quick else "full"
            harness.header(
                "tiercache core benchmark",
                meta,
                method=f"{kind} run; {repeats} rounds per case, each the fastest of {args.parts} batches",
            )
            env = Env(server)
            builders = {"l1": (section_l1, 1000), "l2": (section_l2, 20), "miss": (section_miss, 20)}
            cases: list[Case] = []
            problems: list[str] = []
            for name in sections:
                build, start_n = builders[name]
                harness.progress(f"[{name}] setting up and measuring ...")
                section_cases = build(env)
                full_ms, quick_ms = SAMPLE_MS[name]
                measure(section_cases, repeats, quick_ms if args.quick else full_ms, args.parts, start_n)
                problems += env.run_checks()
                cases += section_cases
            report(cases)
            verdicts = check_targets(cases)
            for problem in problems:
                print(f"  CHECK FAILED: {problem}")
            end = harness.footer(meta, t_start)
            if args.json:
                meta.update(repeats=repeats, parts=args.parts, quick=args.quick, **end)
                harness.write_json(args.json, json_doc(meta, cases, verdicts, problems))
        finally:
            if env is not None:
                env.close()
    return 0


if __name__ == "__main__":
    harness.main(main)

#!/usr/bin/env python3
"""Embeddings benchmark: ``@tiered_batch`` on a batched embeddings workload against aiocache and
dogpile.cache, and the cost of ``invalidate_tags`` / ``clear`` as the number of tagged entries grows.

    .venv/bin/python benchmarks/bench_embeddings.py            # full run (about 3 minutes)
    .venv/bin/python benchmarks/bench_embeddings.py --quick    # smoke test (under 15 s)
    .venv/bin/python benchmarks/bench_embeddings.py --only a --repeats 5 --json out.json

Starts its own throwaway ``redis-server`` (the harness's ``RedisServer``: a free loopback port,
never 6379, no persistence, stopped by pid) and empties it (FLUSHALL of this server only)
before every measured run.

A. Embeddings. A fixed-seed stream of ``--texts`` (10,000) texts in batches of 64, where about
   half the positions repeat a text seen earlier in the stream (drawn uniformly from those seen
   so far); the exact repeat fraction is printed. The cached function costs 1 ms per item it is
   given (one ``time.sleep(0.001 * len(items))`` per call, in async code too) and returns one
   float32 vector of 384 dimensions per item (``.tolist()`` for a library that can store them
   only as lists: aiocache's multi_cached cannot return numpy arrays read from Redis). One
   process, cold caches at the start of every run (FLUSHALL, new cache objects; imports,
   connections and Lua scripts warmed on the first batches beforehand). Then the same
   stream again (warm). Every result of every batch is checked against the expected vector.
   Per row: function calls, items computed, Redis round trips and commands counted in the
   client (every request redis-py writes to a socket from the main thread: a pipeline is one
   round trip; connection set-up and tiercache's subscriber thread left out), commands counted
   by the server (``INFO commandstats`` deltas: Lua ``redis.call``s included, PING and other
   housekeeping left out), wall time (the sum of the batch calls; median of ``--repeats``
   runs), time spent inside the function and the rest (the cache's own cost), and the Redis
   memory the cold pass added (``INFO memory`` used_memory delta, STRLEN of the stored values).
B. Tags. For N tagged entries of ``@tiered(cache, tags=["t"])`` filled in Redis (and L1), the
   time and the commands of ``cache.invalidate_tags("t")`` and of ``cache.clear()``: the first
   with all N entries live, then ``--invalidations`` more, re-filling a few entries between
   them (and checking those are recomputed). For contrast: dropping the N entries one by one
   with ``f.invalidate(x)``, and with a pipeline of N ``DEL``s.
"""

from __future__ import annotations

import asyncio
import gc
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import harness
import numpy as np
import redis
from harness import RedisServer, interleaved
from harness import median as med

from tiercache import TieredCache, tiered, tiered_batch

DIM = 384
BATCH = 64
COST_S = 0.001  # per item given to the function
TTL = 300
SEED = 20240611
PAYLOAD_B = "x" * 100  # the tagged function's value in section B

# Commands that are not the workload's: connection set-up, the subscriber's keep-alive, and
# this script's own INFO / FLUSHALL / SCAN / STRLEN.
HOUSEKEEPING = frozenset(
    {"info", "ping", "hello", "select", "subscribe", "flushall", "dbsize", "scan", "strlen", "memory|usage"}
)


# -- counting what goes to Redis -------------------------------------------------------------


class Wire:
    """What this process's main thread sends to Redis, counted inside redis-py (sync and
    asyncio; tiercache, aiocache and dogpile.cache all go through it). A round trip is one
    request written to a socket (``send_packed_command``: a pipeline or a transaction is one);
    commands are the commands in it. Left out: the commands of connection set-up (HELLO,
    CLIENT SETINFO, SELECT) and other threads (tiercache's invalidation subscriber)."""

    def __init__(self) -> None:
        self.round_trips = 0
        self.commands = 0
        self._main = threading.get_ident()
        self._local = threading.local()

    def counting(self) -> bool:
        return threading.get_ident() == self._main and not getattr(self._local, "setup", 0)

    def snapshot(self) -> tuple[int, int]:
        return self.round_trips, self.commands

    def install(self) -> None:
        import redis.asyncio.connection as aconn
        import redis.connection as sconn

        wire = self
        s_cls, a_cls = sconn.AbstractConnection, aconn.AbstractConnection
        s_send, s_cmd, s_pack, s_setup = (
            s_cls.send_packed_command,
            s_cls.send_command,
            s_cls.pack_commands,
            s_cls.on_connect_check_health,
        )
        a_send, a_cmd, a_pack, a_setup = (
            a_cls.send_packed_command,
            a_cls.send_command,
            a_cls.pack_commands,
            a_cls.on_connect_check_health,
        )

        def send_packed_command(self: Any, *args: Any, **kwargs: Any) -> Any:
            if wire.counting():
                wire.round_trips += 1
            return s_send(self, *args, **kwargs)

        def send_command(self: Any, *args: Any, **kwargs: Any) -> Any:
            if wire.counting():
                wire.commands += 1
            return s_cmd(self, *args, **kwargs)

        def pack_commands(self: Any, commands: Any) -> Any:
            commands = list(commands)
            if wire.counting():
                wire.commands += len(commands)
            return s_pack(self, commands)

        def setup(self: Any, *args: Any, **kwargs: Any) -> Any:
            wire._local.setup = getattr(wire._local, "setup", 0) + 1
            try:
                return s_setup(self, *args, **kwargs)
            finally:
                wire._local.setup -= 1

        async def asend_packed_command(self: Any, *args: Any, **kwargs: Any) -> Any:
            if wire.counting():
                wire.round_trips += 1
            return await a_send(self, *args, **kwargs)

        async def asend_command(self: Any, *args: Any, **kwargs: Any) -> Any:
            if wire.counting():
                wire.commands += 1
            return await a_cmd(self, *args, **kwargs)

        def apack_commands(self: Any, commands: Any) -> Any:
            commands = list(commands)
            if wire.counting():
                wire.commands += len(commands)
            return a_pack(self, commands)

        async def asetup(self: Any, *args: Any, **kwargs: Any) -> Any:
            wire._local.setup = getattr(wire._local, "setup", 0) + 1
            try:
                return await a_setup(self, *args, **kwargs)
            finally:
                wire._local.setup -= 1

        s_cls.send_packed_command = send_packed_command  # type: ignore[method-assign]
        s_cls.send_command = send_command  # type: ignore[method-assign]
        s_cls.pack_commands = pack_commands  # type: ignore[method-assign]
        s_cls.on_connect_check_health = setup  # type: ignore[method-assign]
        a_cls.send_packed_command = asend_packed_command  # type: ignore[method-assign]
        a_cls.send_command = asend_command  # type: ignore[method-assign]
        a_cls.pack_commands = apack_commands  # type: ignore[method-assign]
        a_cls.on_connect_check_health = asetup  # type: ignore[method-assign]


WIRE = Wire()


def server_delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    out = {k: n - before.get(k, 0) for k, n in after.items() if k not in HOUSEKEEPING}
    return {k: n for k, n in sorted(out.items(), key=lambda kv: -kv[1]) if n}


def fmt_breakdown(cmds: dict[str, int], per: float = 1.0) -> str:
    if not cmds:
        return "none"
    return ", ".join(f"{k.upper()} {n / per:,.{0 if per == 1 else 1}f}" for k, n in cmds.items())


# -- the workload ----------------------------------------------------------------------------

WORDS = [
    *("vector", "cache", "token", "model", "query", "search", "index", "embed", "layer", "batch", "redis"),
    *("memory", "latency", "python", "document", "passage", "answer", "context", "window", "retrieval"),
    *("ranking", "semantic", "dense", "sparse", "cosine", "distance", "neighbour", "cluster", "shard"),
]


@dataclass
class Stream:
    texts: list[str]
    batches: list[list[str]]
    distinct: int
    repeats: int  # positions whose text appeared earlier in the stream
    in_batch_repeats: int  # ... earlier in the same batch
    new_per_batch: list[int]  # texts first seen in each batch (distinct)
    vectors: dict[str, np.ndarray]

    @property
    def batches_with_new(self) -> int:
        return sum(1 for n in self.new_per_batch if n)


def make_stream(n: int, repeat_p: float = 0.5) -> Stream:
    rng = random.Random(SEED)
    seen: list[str] = []
    texts: list[str] = []
    for _ in range(n):
        if seen and rng.random() < repeat_p:
            texts.append(rng.choice(seen))
        else:
            text = f"passage {len(seen)}: " + " ".join(rng.choice(WORDS) for _ in range(9))
            seen.append(text)
            texts.append(text)
    batches = [texts[i : i + BATCH] for i in range(0, n, BATCH)]
    first_seen: set[str] = set()
    new_per_batch = []
    in_batch = 0
    for batch in batches:
        here: set[str] = set()
        new = 0
        for t in batch:
            if t in here:
                in_batch += 1
            elif t not in first_seen:
                new += 1
            here.add(t)
            first_seen.add(t)
        new_per_batch.append(new)
    matrix = np.random.default_rng(SEED).standard_normal((len(seen), DIM), dtype=np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    vectors = {t: matrix[i] for i, t in enumerate(seen)}
    return Stream(texts, batches, len(seen), n - len(seen), in_batch, new_per_batch, vectors)


class Probe:
    """The cached function's side: calls, items computed, seconds spent inside it."""

    def __init__(self, stream: Stream) -> None:
        self.vectors = stream.vectors
        self.calls = 0
        self.items = 0
        self.seconds = 0.0

    def compute(self, texts: list[str], as_list: bool) -> list[Any]:
        t0 = time.perf_counter()
        self.calls += 1
        self.items += len(texts)
        time.sleep(COST_S * len(texts))
        vectors = self.vectors
        out = [vectors[t].tolist() if as_list else vectors[t].copy() for t in texts]
        self.seconds += time.perf_counter() - t0
        return out

    def snapshot(self) -> tuple[int, int, float]:
        return self.calls, self.items, self.seconds


# -- the rows of section A -------------------------------------------------------------------


@dataclass
class Impl:
    call: Callable[[list[str]], Any]  # returns the results (a coroutine for async rows)
    is_async: bool
    close: Callable[[], Any]  # returns a coroutine for async rows
    cache: TieredCache | None = None


class Env:
    def __init__(self, server: RedisServer) -> None:
        assert server.port != 6379
        self.server = server
        self.port = server.port
        self.loop = asyncio.new_event_loop()
        self.admin = redis.Redis(host="127.0.0.1", port=server.port)
        self.problems: list[str] = []  # tiercache misbehaving: the run fails
        self.notes: list[str] = []  # peers' surprises: reported only

    def aio(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def flush(self) -> None:
        self.admin.flushall(asynchronous=False)

    def used_memory(self) -> int:
        return int(self.admin.info("memory")["used_memory"])

    def tiercache(self, namespace: str, **kw: Any) -> TieredCache:
        cache = TieredCache(self.server.url, namespace=namespace, ttl=TTL, **kw)
        if not cache.ready(10.0):
            raise RuntimeError(f"tiercache {namespace}: the invalidation subscriber did not connect")
        return cache

    def value_bytes(self) -> tuple[int, int]:
        """(keys, total STRLEN of the string keys) in the server's db 0."""
        keys = list(self.admin.scan_iter(count=1000))
        total = 0
        for i in range(0, len(keys), 1000):
            pipe = self.admin.pipeline(transaction=False)
            for k in keys[i : i + 1000]:
                pipe.strlen(k)
            total += sum(r for r in pipe.execute(raise_on_error=False) if isinstance(r, int))
        return len(keys), total

    def close(self) -> None:
        self.admin.close()
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


def make_tier_sync(env: Env, probe: Probe, namespace: str = "emb", **kw: Any) -> Impl:
    cache = env.tiercache(namespace, **kw)

    @tiered_batch(cache, ttl=TTL, name="embed")
    def embed(texts: list[str]) -> list[np.ndarray]:
        return probe.compute(texts, False)

    return Impl(embed, False, cache.close, cache)


def make_tier_async(env: Env, probe: Probe, namespace: str = "emb") -> Impl:
    cache = env.tiercache(namespace)

    @tiered_batch(cache, ttl=TTL, name="embed")
    async def embed(texts: list[str]) -> list[np.ndarray]:
        return probe.compute(texts, False)

    return Impl(embed, True, cache.aclose, cache)


def make_aiocache(env: Env, probe: Probe, msgpack: bool, namespace: str = "emb:") -> Impl:
    """Lists of floats: multi_cached tests ``None not in values`` on what it read, which raises
    for numpy arrays (``ValueError: The truth value of an array ... is ambiguous``) as soon as a
    batch is answered from Redis, whatever the serializer (pickle included)."""
    from aiocache import RedisCache, multi_cached
    from aiocache.serializers import JsonSerializer, MsgPackSerializer

    # encoding=None: the Redis backend would otherwise decode the msgpack bytes as UTF-8
    serializer = MsgPackSerializer(encoding=None) if msgpack else JsonSerializer()

    @multi_cached(
        keys_from_attr="texts",
        cache=RedisCache,
        endpoint="127.0.0.1",
        port=env.port,
        namespace=namespace,
        ttl=TTL,
        serializer=serializer,
    )
    async def embed(texts: list[str]) -> dict[str, Any]:
        return dict(zip(texts, probe.compute(list(texts), True), strict=True))

    async def call(batch: list[str]) -> list[Any]:
        got = await embed(batch)
        return [got[t] for t in batch]

    return Impl(call, True, embed.cache.close)  # type: ignore[attr-defined]


def make_dogpile(env: Env, probe: Probe, namespace: str = "emb") -> Impl:
    from dogpile.cache import make_region

    region = make_region().configure(
        "dogpile.cache.redis",
        expiration_time=TTL,
        arguments={
            "host": "127.0.0.1",
            "port": env.port,  # dogpile's default is 6379: always pass ours
            "db": 0,
            "redis_expiration_time": TTL,
            "distributed_lock": False,
        },
    )

    @region.cache_multi_on_arguments(namespace=namespace)
    def embed(*texts: str) -> list[np.ndarray]:
        return probe.compute(list(texts), False)

    def call(batch: list[str]) -> list[Any]:
        return embed(*batch)  # type: ignore[no-any-return]

    def close() -> None:
        region.backend.writer_client.connection_pool.disconnect()
        region.backend.reader_client.connection_pool.disconnect()

    return Impl(call, False, close)


@dataclass
class RowSpec:
    key: str
    label: str
    stores: str
    make: Callable[[Env, Probe], Impl]
    tier: bool = False  # a tiercache row: its counts are checked, a mismatch fails the run
    l2_row: bool = False  # also measure the warm pass with a new cache object (empty L1)


def row_specs() -> list[RowSpec]:
    specs = [
        RowSpec(
            "tier_sync",
            "tiercache @tiered_batch (sync)",
            "numpy float32 (msgpack ext: raw bytes; zstd when smaller)",
            make_tier_sync,
            tier=True,
            l2_row=True,
        ),
        RowSpec(
            "tier_sync_raw",
            "tiercache @tiered_batch (sync, compression=None)",
            "numpy float32 (msgpack ext: raw bytes)",
            lambda env, probe: make_tier_sync(env, probe, compression=None),
            tier=True,
            l2_row=True,
        ),
        RowSpec(
            "tier_async",
            "tiercache @tiered_batch (async)",
            "numpy float32 (msgpack ext: raw bytes; zstd when smaller)",
            make_tier_async,
            tier=True,
        ),
    ]
    try:
        import aiocache  # noqa: F401

        specs.append(
            RowSpec(
                "aiocache_json",
                "aiocache multi_cached (RedisCache, async)",
                "list of floats, JSON text (its default serializer)",
                lambda env, probe: make_aiocache(env, probe, msgpack=False),
            )
        )
        specs.append(
            RowSpec(
                "aiocache_msgpack",
                "aiocache multi_cached + MsgPackSerializer",
                "list of floats, msgpack (float64 each)",
                lambda env, probe: make_aiocache(env, probe, msgpack=True),
            )
        )
    except ImportError:
        print("  (aiocache not installed: its rows are skipped)")
    try:
        import dogpile.cache  # noqa: F401

        specs.append(
            RowSpec(
                "dogpile",
                "dogpile.cache cache_multi_on_arguments (redis)",
                "numpy float32, pickled in a CachedValue (its default)",
                make_dogpile,
            )
        )
    except ImportError:
        print("  (dogpile.cache not installed: its row is skipped)")
    return specs


# -- one pass over the stream ----------------------------------------------------------------


@dataclass
class PassResult:
    wall_s: float
    fn_calls: int
    fn_items: int
    fn_s: float
    round_trips: int
    commands: int
    server: dict[str, int]
    wrong: int
    first_wrong: str
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def server_total(self) -> int:
        return sum(self.server.values())


def _check(stream: Stream, batch: list[str], out: Any, bad: list[str]) -> int:
    if not isinstance(out, list) or len(out) != len(batch):
        bad.append(f"a batch of {len(batch)} returned {type(out).__name__} of {len(out) if out else 0}")
        return len(batch)
    wrong = 0
    for t, v in zip(batch, out, strict=True):
        if not np.array_equal(np.asarray(v, dtype=np.float32), stream.vectors[t]):
            wrong += 1
            if not bad:
                bad.append(f"wrong vector for {t!r}")
    return wrong


def _sync_pass(impl: Impl, stream: Stream) -> tuple[float, int, str]:
    wall = 0
    wrong = 0
    bad: list[str] = []
    call = impl.call
    for batch in stream.batches:
        t0 = time.perf_counter_ns()
        out = call(batch)
        wall += time.perf_counter_ns() - t0
        wrong += _check(stream, batch, out, bad)
    return wall / 1e9, wrong, bad[0] if bad else ""


async def _async_pass(impl: Impl, stream: Stream) -> tuple[float, int, str]:
    wall = 0
    wrong = 0
    bad: list[str] = []
    call = impl.call
    for batch in stream.batches:
        t0 = time.perf_counter_ns()
        out = await call(batch)
        wall += time.perf_counter_ns() - t0
        wrong += _check(stream, batch, out, bad)
    return wall / 1e9, wrong, bad[0] if bad else ""


STAT_FIELDS = ("l1_hits", "l2_hits", "misses", "loads", "backend_errors", "codec_errors", "not_cached")


def run_pass(env: Env, impl: Impl, stream: Stream, probe: Probe) -> PassResult:
    gc.collect()
    p0 = probe.snapshot()
    st0 = impl.cache.stats() if impl.cache is not None else None
    s0 = harness.commandstats(env.admin)
    w0 = WIRE.snapshot()
    if impl.is_async:
        wall, wrong, first = env.aio(_async_pass(impl, stream))
    else:
        wall, wrong, first = _sync_pass(impl, stream)
    w1 = WIRE.snapshot()
    s1 = harness.commandstats(env.admin)
    p1 = probe.snapshot()
    stats: dict[str, int] = {}
    if impl.cache is not None and st0 is not None:
        st1 = impl.cache.stats()
        stats = {f: getattr(st1, f) - getattr(st0, f) for f in STAT_FIELDS}
    return PassResult(
        wall_s=wall,
        fn_calls=p1[0] - p0[0],
        fn_items=p1[1] - p0[1],
        fn_s=p1[2] - p0[2],
        round_trips=w1[0] - w0[0],
        commands=w1[1] - w0[1],
        server=server_delta(s1, s0),
        wrong=wrong,
        first_wrong=first,
        stats=stats,
    )


def close_impl(env: Env, impl: Impl) -> None:
    result = impl.close()
    if asyncio.iscoroutine(result):
        env.aio(result)


def warm_up(env: Env, spec: RowSpec, stream: Stream) -> None:
    """Imports, connections and Lua scripts warmed on the first batches, then Redis emptied."""
    probe = Probe(stream)
    short = Stream(stream.texts, stream.batches[:3], 0, 0, 0, [], stream.vectors)
    impl = spec.make(env, probe)
    for _ in range(2):
        run_pass(env, impl, short, probe)
    close_impl(env, impl)
    env.flush()


@dataclass
class RowResult:
    spec: RowSpec
    cold: list[PassResult] = field(default_factory=list)
    warm: list[PassResult] = field(default_factory=list)
    warm_l2: list[PassResult] = field(default_factory=list)
    mem_delta: list[int] = field(default_factory=list)
    keys: list[int] = field(default_factory=list)
    value_bytes: list[int] = field(default_factory=list)


def section_embeddings(env: Env, stream: Stream, repeats: int, warm_passes: int) -> list[RowResult]:
    specs = row_specs()
    results = [RowResult(s) for s in specs]
    for spec in specs:
        print(f"[A] warming up {spec.key} ...", file=sys.stderr, flush=True)
        warm_up(env, spec, stream)
    for r in range(repeats):
        for res in interleaved(results, r):  # neighbours swap places every run
            spec = res.spec
            print(f"[A] run {r + 1}/{repeats}: {spec.key} ...", file=sys.stderr, flush=True)
            env.flush()
            probe = Probe(stream)
            impl = spec.make(env, probe)
            mem0 = env.used_memory()
            res.cold.append(run_pass(env, impl, stream, probe))
            res.mem_delta.append(env.used_memory() - mem0)
            nkeys, nbytes = env.value_bytes()
            res.keys.append(nkeys)
            res.value_bytes.append(nbytes)
            for _ in range(warm_passes):
                res.warm.append(run_pass(env, impl, stream, probe))
            close_impl(env, impl)
            if spec.l2_row:  # a new cache object: what a new process sees with Redis warm
                for _ in range(warm_passes):
                    fresh = spec.make(env, probe)
                    res.warm_l2.append(run_pass(env, fresh, stream, probe))
                    close_impl(env, fresh)
    for res in results:
        check_row(env, res, stream)
    return results


def check_row(env: Env, res: RowResult, stream: Stream) -> None:
    spec = res.spec
    sink = env.problems if spec.tier else env.notes
    for kind, passes in (("cold", res.cold), ("warm", res.warm), ("warm, new cache object", res.warm_l2)):
        for p in passes:
            if p.wrong:
                sink.append(f"{spec.label}, {kind} pass: {p.wrong} wrong results ({p.first_wrong})")
                break
    if not spec.tier:
        return
    new_batches = stream.batches_with_new
    want_cold = {
        "function calls": new_batches,
        "items computed": stream.distinct,
        "round trips": 2 * new_batches,
        "commands sent": sum(2 * n + 1 for n in stream.new_per_batch if n),
    }
    want_warm = {"function calls": 0, "items computed": 0, "round trips": 0, "commands sent": 0}
    want_l2 = {
        "function calls": 0,
        "items computed": 0,
        "round trips": new_batches,
        "commands sent": 2 * stream.distinct,
    }
    for kind, passes, want in (
        ("cold", res.cold, want_cold),
        ("warm", res.warm, want_warm),
        ("warm, new cache object", res.warm_l2, want_l2),
    ):
        for p in passes:
            got = {
                "function calls": p.fn_calls,
                "items computed": p.fn_items,
                "round trips": p.round_trips,
                "commands sent": p.commands,
            }
            diff = [f"{k} {got[k]:,} (expected {v:,})" for k, v in want.items() if got[k] != v]
            if p.stats.get("backend_errors") or p.stats.get("codec_errors") or p.stats.get("not_cached"):
                diff.append(f"counters {p.stats}")
            if diff:
                sink.append(f"{spec.label}, {kind} pass: " + "; ".join(diff))
                break


# -- section B: tags and clear ---------------------------------------------------------------


@dataclass
class OpResult:
    first_us: float
    samples_us: list[float]
    round_trips: list[int]
    commands: list[int]
    server: list[dict[str, int]]

    @property
    def median_us(self) -> float:
        return statistics.median(self.samples_us)


@dataclass
class TagResult:
    n: int
    fill_s: float
    tags: OpResult
    clear: OpResult
    per_key_ms: float
    per_key_rt: int
    per_key_cmds: int
    del_ms: float
    del_rt: int
    del_cmds: int
    del_left_l1: bool


def _timed_op(env: Env, op: Callable[[], Any]) -> tuple[float, int, int, dict[str, int]]:
    s0 = harness.commandstats(env.admin)
    w0 = WIRE.snapshot()
    t0 = time.perf_counter_ns()
    op()
    dt = (time.perf_counter_ns() - t0) / 1000
    w1 = WIRE.snapshot()
    s1 = harness.commandstats(env.admin)
    return dt, w1[0] - w0[0], w1[1] - w0[1], server_delta(s1, s0)


def section_tags(env: Env, sizes: list[int], invalidations: int, few: int) -> list[TagResult]:
    return [_tags_for(env, n, invalidations, few) for n in sizes]


def _tags_for(env: Env, n: int, invalidations: int, few: int) -> TagResult:
    print(f"[B] N = {n:,} ...", file=sys.stderr, flush=True)
    env.flush()
    cache = env.tiercache("bench.tags", l1_maxsize=max(10_000, 2 * n + 100))  # every entry fits in L1
    calls = [0]

    @tiered(cache, tags=["t"], name="tagged")
    def f(x: int) -> str:
        calls[0] += 1
        return PAYLOAD_B

    def fill(start: int, stop: int, what: str) -> float:
        """f(start..stop-1), every one of which must call the function (a miss)."""
        count = max(0, stop - start)
        before = calls[0]
        t0 = time.perf_counter()
        for i in range(start, stop):
            f(i)
        took = time.perf_counter() - t0
        if calls[0] - before != count:
            env.problems.append(
                f"N={n:,}, {what}: {calls[0] - before:,} function calls for {count:,} entries expected to be "
                "recomputed (an invalidation did not take effect, or entries survived it)"
            )
        return took

    def measure(op: Callable[[], Any], what: str) -> OpResult:
        gc.collect()
        res = OpResult(0.0, [], [], [], [])
        for j in range(invalidations):
            dt, rt, cmds, srv = _timed_op(env, op)
            if j == 0:
                res.first_us = dt
            res.samples_us.append(dt)
            res.round_trips.append(rt)
            res.commands.append(cmds)
            res.server.append(srv)
            fill(0, min(n, few), f"after {what} #{j + 1}")  # these must be recomputed
        return res

    # warm the connection and the Lua scripts (a NOSCRIPT fallback would add a round trip)
    cache.invalidate_tags("warm-up")
    cache.clear()
    fill_s = fill(0, n, "first fill")
    tags = measure(lambda: cache.invalidate_tags("t"), "invalidate_tags")
    # n live entries again (the first `few` were recomputed after the last operation)
    fill(min(n, few), n, "re-fill after invalidate_tags")
    clear = measure(cache.clear, "clear")
    fill(min(n, few), n, "re-fill after clear")

    # contrast: one by one (each a script: DEL + publish, one round trip)
    gc.collect()
    dt, pk_rt, pk_cmds, _ = _timed_op(env, lambda: [f.invalidate(i) for i in range(n)])
    per_key_ms = dt / 1000
    fill(0, n, "re-fill after f.invalidate of every entry")
    keys = [f.key(i) for i in range(n)]

    def pipeline_del() -> None:
        pipe = env.admin.pipeline(transaction=False)
        for k in keys:
            pipe.delete(k)
        pipe.execute()

    gc.collect()
    dt, del_rt, del_cmds, _ = _timed_op(env, pipeline_del)
    before = calls[0]
    f(0)  # Redis has lost it; this process's L1 has not been told
    left_l1 = calls[0] == before
    cache.close()
    return TagResult(n, fill_s, tags, clear, per_key_ms, pk_rt, pk_cmds, dt / 1000, del_rt, del_cmds, left_l1)


# -- report ----------------------------------------------------------------------------------


def _counts(passes: list[PassResult], attr: str) -> str:
    vals = [getattr(p, attr) for p in passes]
    lo, hi = min(vals), max(vals)
    return f"{int(med(vals)):,}" if lo == hi else f"{med(vals):,.0f} [{lo:,}-{hi:,}]"


def report_embeddings(results: list[RowResult], stream: Stream, repeats: int, warm_passes: int) -> None:
    n = len(stream.texts)
    print(
        f"\nA. Embeddings: {n:,} texts in {len(stream.batches)} batches of {BATCH}, {stream.distinct:,} distinct; "
        f"repeats {stream.repeats:,} = {stream.repeats / n:.2%} of positions "
        f"({stream.in_batch_repeats} of them repeat a text earlier in the same batch)"
    )
    print(
        f"   function: time.sleep({COST_S} * len(items)) once per call, float32[{DIM}] per item; "
        f"cold caches each run; {repeats} run(s), medians; warm pass x{warm_passes} per run"
    )
    print(
        f"   ideal: {stream.distinct:,} items computed in {stream.batches_with_new} calls "
        f"(the batches holding a text not seen before); {stream.distinct * COST_S:.2f} s of function time"
    )
    print("\n   Stored values:")
    for res in results:
        print(f"     {res.spec.label:<48} {res.spec.stores}")

    print("\nA1. Cold pass (empty Redis, empty L1)")
    h = (
        f"  {'library':<48} {'calls':>6} {'items':>7} {'round trips':>12} {'cmds sent':>10} "
        f"{'Redis cmds':>11} {'wall s':>7} {'in fn s':>8} {'rest s':>7} {'rest/batch':>11}"
    )
    print(h + "\n  " + "-" * (len(h) - 2))
    for res in results:
        c = res.cold
        wall = med([p.wall_s for p in c])
        fn = med([p.fn_s for p in c])
        rest = med([p.wall_s - p.fn_s for p in c])
        print(
            f"  {res.spec.label:<48} {_counts(c, 'fn_calls'):>6} {_counts(c, 'fn_items'):>7} "
            f"{_counts(c, 'round_trips'):>12} {_counts(c, 'commands'):>10} {_counts(c, 'server_total'):>11} "
            f"{wall:>7.2f} {fn:>8.2f} {rest:>7.3f} {rest / len(stream.batches) * 1000:>8.2f} ms"
        )
    print(
        "  (rest = wall - time inside the function; round trips and cmds sent: counted in redis-py on the calling\n"
        "   thread; Redis cmds: by the server, Lua redis.calls included)"
    )

    print("\nA2. Redis memory after the cold pass")
    h = f"  {'library':<48} {'keys':>7} {'value B/entry':>14} {'used_memory +':>14} {'per key':>9}"
    print(h + "\n  " + "-" * (len(h) - 2))
    for res in results:
        keys = med(res.keys)
        print(
            f"  {res.spec.label:<48} {keys:>7,.0f} {med(res.value_bytes) / stream.distinct:>14,.0f} "
            f"{med(res.mem_delta) / 2**20:>11.2f} MB {med(res.mem_delta) / max(keys, 1):>7,.0f} B"
        )
    print(
        f"  (value B/entry: STRLEN of every key / distinct texts; raw float32[{DIM}] = {DIM * 4:,} B; "
        "used_memory + includes key names and Redis's per-key overhead)"
    )

    print("\nA3. Warm pass: the same stream again")
    h = (
        f"  {'library':<60} {'served from':<40} {'calls':>6} {'round trips':>12} {'cmds sent':>10} "
        f"{'Redis cmds':>11} {'wall ms':>8} {'µs/text':>8}"
    )
    print(h + "\n  " + "-" * (len(h) - 2))
    rows: list[tuple[str, list[PassResult], bool]] = []
    for res in results:
        rows.append((res.spec.label + (", same cache" if res.spec.tier else ""), res.warm, res.spec.tier))
        if res.warm_l2:
            rows.append(("  ... a new cache object (empty L1)", res.warm_l2, True))
    for label, passes, tier in rows:
        wall = med([p.wall_s for p in passes])
        if tier:
            l1 = med([p.stats.get("l1_hits", 0) for p in passes])
            l2 = med([p.stats.get("l2_hits", 0) for p in passes])
            served = f"L1 {l1:,.0f}, Redis {l2:,.0f} (distinct/batch)"
        else:
            served = f"Redis {len(stream.texts) - med([p.fn_items for p in passes]):,.0f} (positions)"
        print(
            f"  {label:<60} {served:<40} {_counts(passes, 'fn_calls'):>6} {_counts(passes, 'round_trips'):>12} "
            f"{_counts(passes, 'commands'):>10} {_counts(passes, 'server_total'):>11} {wall * 1000:>8.1f} "
            f"{wall / len(stream.texts) * 1e6:>8.2f}"
        )

    print("\n   Redis commands by name (INFO commandstats delta of the first run; Lua redis.calls included)")
    for res in results:
        print(f"     {res.spec.label}, cold: {fmt_breakdown(res.cold[0].server)}")
        print(f"     {'':<{len(res.spec.label)}}  warm: {fmt_breakdown(res.warm[0].server)}")
        if res.warm_l2:
            print(f"     {'':<{len(res.spec.label)}}  new cache object: {fmt_breakdown(res.warm_l2[0].server)}")


def report_tags(results: list[TagResult], invalidations: int, few: int) -> None:
    print(
        f"\nB. Tag invalidation and clear() as tagged entries grow: @tiered(cache, tags=['t']), "
        f"{len(PAYLOAD_B)} B values, N entries filled in Redis and L1 (l1_maxsize above 2N); per N, "
        f"{invalidations} operations: the first with all N entries live, then min(N, {few}) entries re-filled "
        "(and checked to be recomputed) after each. µs per operation; rt = round trips, cmds = commands sent, "
        "Redis = commands the server ran"
    )
    h = (
        f"  {'N entries':>9} | {'invalidate_tags: first':>22} {'median':>8} {'[min-max]':>15} {'rt':>3} "
        f"{'cmds':>4} {'Redis':>5} | {'clear(): first':>14} {'median':>8} {'[min-max]':>15} {'rt':>3} "
        f"{'cmds':>4} {'Redis':>5}"
    )
    print(h + "\n  " + "-" * (len(h) - 2))
    for r in results:
        cells = []
        for op, width in ((r.tags, 22), (r.clear, 14)):
            rt = f"{int(med(op.round_trips))}" if min(op.round_trips) == max(op.round_trips) else "var"
            cmds = f"{int(med(op.commands))}" if min(op.commands) == max(op.commands) else "var"
            srv = med([sum(s.values()) for s in op.server])
            spread = f"[{min(op.samples_us):,.0f}-{max(op.samples_us):,.0f}]"
            cells.append(
                f"{op.first_us:>{width},.0f} {op.median_us:>8,.0f} {spread:>15} {rt:>3} {cmds:>4} {srv:>5,.0f}"
            )
        print(f"  {r.n:>9,} | {cells[0]} | {cells[1]}")
    if results:
        print(
            "  Redis commands per operation (server side): "
            f"invalidate_tags: {fmt_breakdown(results[-1].tags.server[0])}; "
            f"clear: {fmt_breakdown(results[-1].clear.server[0])}"
        )

    print("\n  For contrast, dropping the N entries one at a time or in one pipeline (one run each):")
    h = (
        f"  {'N entries':>9} | {'f.invalidate(x) x N':>19} {'µs/key':>7} {'rt':>7} | "
        f"{'pipeline of N DELs':>18} {'rt':>3} {'cmds':>7} {'L1 copy left':>13} | "
        f"{'÷ invalidate_tags median':>24}"
    )
    print(h + "\n  " + "-" * (len(h) - 2))
    for r in results:
        ratio = f"{r.per_key_ms * 1000 / r.tags.median_us:,.0f}x / {r.del_ms * 1000 / r.tags.median_us:,.1f}x"
        print(
            f"  {r.n:>9,} | {r.per_key_ms:>16,.1f} ms {r.per_key_ms * 1000 / r.n:>7.1f} {r.per_key_rt:>7,} | "
            f"{r.del_ms:>15,.2f} ms {r.del_rt:>3} {r.del_cmds:>7,} {'yes' if r.del_left_l1 else 'no':>13} | "
            f"{ratio:>24}"
        )
    print(
        "  (÷ invalidate_tags median: one-by-one / DEL pipeline. L1 copy left: after the DELs this process still "
        "answered f(0) from its L1 without calling the function)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(
        __doc__,
        quick="640 texts, 1 run, N up to 1,000: a smoke test",
        repeats="cold runs per library (default 3; --quick 1)",
    )
    parser.add_argument("--texts", type=int, help="texts in the stream (default 10,000; --quick 640)")
    parser.add_argument("--warm-passes", type=int, help="warm passes per run (default 3; --quick 1)")
    parser.add_argument("--sizes", help="section B's N values, comma-separated (default 10,100,1000,10000)")
    parser.add_argument("--invalidations", type=int, help="operations per N in section B (default 20; --quick 5)")
    parser.add_argument("--only", default="a,b", help="sections to run: a,b")
    args = harness.parse(parser, argv)
    texts = args.texts or (640 if args.quick else 10_000)
    repeats = args.repeats or (1 if args.quick else 3)
    warm_passes = args.warm_passes or (1 if args.quick else 3)
    sizes = (
        [int(s) for s in args.sizes.split(",")] if args.sizes else [10, 100, 1_000] + ([] if args.quick else [10_000])
    )
    invalidations = args.invalidations or (5 if args.quick else 20)
    few = 8
    sections = {s.strip() for s in args.only.split(",") if s.strip()}
    if sections - {"a", "b"}:
        parser.error(f"unknown sections: {sorted(sections - {'a', 'b'})}")

    env: Env | None = None
    t_start = time.monotonic()
    with harness.redis_server(args.redis_server) as server:
        try:
            WIRE.install()
            meta = harness.environment(server)
            kind = "--quick" if args.quick else "full"
            harness.header(
                "tiercache embeddings benchmark: @tiered_batch and tag invalidation",
                meta,
                method=(
                    f"{kind} run; A: {texts:,} texts, {repeats} cold run(s) per library, {warm_passes} warm "
                    f"pass(es) per run; B: N in {sizes}, {invalidations} operations per N; medians"
                ),
            )
            env = Env(server)
            stream = make_stream(texts)
            emb: list[RowResult] = []
            tag_results: list[TagResult] = []
            if "a" in sections:
                emb = section_embeddings(env, stream, repeats, warm_passes)
                report_embeddings(emb, stream, repeats, warm_passes)
            if "b" in sections:
                tag_results = section_tags(env, sizes, invalidations, few)
                report_tags(tag_results, invalidations, few)
            for note in env.notes:
                print(f"  NOTE (peer): {note}")
            for problem in env.problems:
                print(f"  CHECK FAILED (tiercache): {problem}")
            meta.update(quick=args.quick, **harness.footer(meta, t_start))
            if args.json:
                harness.write_json(args.json, json_doc(meta, stream, emb, tag_results, env))
            return 1 if env.problems else 0
        finally:
            if env is not None:
                env.close()


def json_doc(
    meta: dict[str, Any], stream: Stream, emb: list[RowResult], tags: list[TagResult], env: Env
) -> dict[str, Any]:
    def pas(p: PassResult) -> dict[str, Any]:
        return {
            "wall_s": p.wall_s,
            "fn_calls": p.fn_calls,
            "fn_items": p.fn_items,
            "fn_s": p.fn_s,
            "round_trips": p.round_trips,
            "commands_sent": p.commands,
            "server_commands": p.server,
            "wrong": p.wrong,
            "stats": p.stats,
        }

    return {
        "meta": meta,
        "stream": {
            "texts": len(stream.texts),
            "batches": len(stream.batches),
            "distinct": stream.distinct,
            "repeats": stream.repeats,
            "in_batch_repeats": stream.in_batch_repeats,
            "batches_with_new": stream.batches_with_new,
        },
        "embeddings": [
            {
                "key": r.spec.key,
                "label": r.spec.label,
                "stores": r.spec.stores,
                "cold": [pas(p) for p in r.cold],
                "warm": [pas(p) for p in r.warm],
                "warm_new_cache": [pas(p) for p in r.warm_l2],
                "used_memory_delta": r.mem_delta,
                "keys": r.keys,
                "value_bytes": r.value_bytes,
            }
            for r in emb
        ],
        "tags": [
            {
                "n": t.n,
                "fill_s": t.fill_s,
                "invalidate_tags_us": t.tags.samples_us,
                "invalidate_tags_round_trips": t.tags.round_trips,
                "invalidate_tags_server": t.tags.server,
                "clear_us": t.clear.samples_us,
                "clear_round_trips": t.clear.round_trips,
                "clear_server": t.clear.server,
                "per_key_ms": t.per_key_ms,
                "per_key_round_trips": t.per_key_rt,
                "pipeline_del_ms": t.del_ms,
                "pipeline_del_commands": t.del_cmds,
            }
            for t in tags
        ],
        "notes": env.notes,
        "check_failures": env.problems,
    }


if __name__ == "__main__":
    harness.main(main)

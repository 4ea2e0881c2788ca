#!/usr/bin/env python3
"""Stampede benchmark: many concurrent callers of one cold key, and a Zipf trace, against peers.

    .venv/bin/python benchmarks/bench_stampede.py            # full run (about 5 minutes)
    .venv/bin/python benchmarks/bench_stampede.py --quick    # smoke test (about 12 s)
    .venv/bin/python benchmarks/bench_stampede.py --only stampede --trials 15 --json out.json

Starts its own throwaway ``redis-server`` (the harness's ``RedisServer``: a free loopback port,
never 6379, no persistence, stopped by pid) and a pool of worker processes (``spawn``) that
live for the whole run. Every library gets the same server, the same TTL (300 s) and the same
function: 50 ms of ``time.sleep`` (sync) or ``asyncio.sleep`` (async), returning a short string.

A. Stampede. ``--callers`` (1,000) concurrent callers of one cold key, in one process, then
   spread over ``--procs`` (4) processes. Per trial, with a new key: every worker starts its
   callers (threads, or tasks on its event loop) and parks them on an event; when all workers
   report ready, the parent fixes a release moment ``t0`` a few ms ahead (CLOCK_MONOTONIC, shared
   by all processes on Linux) and each worker sets its event at ``t0``. Wall time = from ``t0``
   to the last caller's answer, in the slowest process; function calls = total over processes.
   Medians over ``--trials`` trials, with the worst trial and the Redis commands per trial.
B. Zipf trace. ``--zipf-requests`` requests over ``--zipf-keys`` keys (Zipf ``s``, fixed seed),
   served by ``--zipf-callers`` concurrent callers (tasks or threads) pulling the next request
   from the trace, in one process; Redis is emptied (FLUSHALL of this benchmark's own server)
   before each library. Reports function calls (the ideal is the number of distinct keys),
   Redis round trips counted in the client (every request redis-py writes to a socket: a
   pipeline is one), Redis commands counted by the server (``INFO commandstats``), wall time
   and requests per second.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import math
import multiprocessing as mp
import os
import random
import secrets
import signal
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import harness
import redis
import redis.asyncio
from harness import RedisServer, percentile

from tiercache import TieredCache, tiered

TTL = 300
TIERCACHE_SLACK_MS = 10.0  # target: wall time within this of the function's own time
TRIAL_TIMEOUT = 60.0  # seconds a trial may take before its stragglers count as hung
ZIPF_TIMEOUT = 900.0  # seconds a library may take for the Zipf trace before its worker is replaced
# aiocache and dogpile.cache get a *blocking* redis-py pool of this many connections: with their
# default (redis-py 8's plain pool, 100 connections, raising MaxConnectionsError when all are
# busy) hundreds of concurrent callers make aiocache fall through to the function, and make
# dogpile's distributed lock fail to release (see POOL_NOTE). tiercache (64) and cashews (10)
# use blocking pools by default.
PEER_POOL = 100
# dogpile's distributed lock never expires by default (lock_timeout=None): one failed release
# and every later caller of that key polls forever. Bounded like tiercache's lease (10 s).
DOGPILE_LOCK_TIMEOUT = 10
POOL_NOTE = (
    f"aiocache and dogpile.cache use redis-py BlockingConnectionPool(max_connections={PEER_POOL}); dogpile's "
    f"distributed lock gets lock_timeout={DOGPILE_LOCK_TIMEOUT} s (why: docs/benchmarks.md)"
)

# -- the worker processes ----------------------------------------------------------------------

_ROUND_TRIPS = [0]
_ROUND_TRIPS_LOCK = threading.Lock()


def _count_round_trips() -> None:
    """Count every request redis-py writes to a socket (sync and asyncio): one per command,
    one per pipeline. tiercache, cashews, aiocache and dogpile.cache all talk through these."""
    import redis.asyncio.connection as aconn
    import redis.connection as sconn

    sync_send = sconn.AbstractConnection.send_packed_command
    async_send = aconn.AbstractConnection.send_packed_command

    def counted(self: Any, command: Any, check_health: bool = True) -> Any:
        with _ROUND_TRIPS_LOCK:
            _ROUND_TRIPS[0] += 1
        return sync_send(self, command, check_health)

    async def acounted(self: Any, command: Any, check_health: bool = True) -> Any:
        with _ROUND_TRIPS_LOCK:
            _ROUND_TRIPS[0] += 1
        return await async_send(self, command, check_health)

    sconn.AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]
    aconn.AbstractConnection.send_packed_command = acounted  # type: ignore[method-assign]


class LogCounter(logging.Handler):
    """Counts log records (WARNING and up) instead of printing them: libraries that fail open
    log every failure, and thousands of tracebacks would bury the tables."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.first: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if self.first is None:
            exc = f" ({record.exc_info[1]!r})" if record.exc_info else ""
            self.first = f"{record.name}: {record.getMessage()[:160]}{exc[:200]}"

    def take(self) -> tuple[int, str | None]:
        out = (self.count, self.first)
        self.count, self.first = 0, None
        return out


LOGS = LogCounter()


class Counter:
    """Calls of the benchmarked function in this process (threads too)."""

    def __init__(self) -> None:
        self.n = 0
        self._lock = threading.Lock()
        self.first_start = math.inf  # when a call first started and last returned (monotonic)
        self.last_end = -math.inf

    def hit(self) -> None:
        now = time.monotonic()
        with self._lock:
            self.n += 1
            self.first_start = min(self.first_start, now)

    def done(self) -> None:
        now = time.monotonic()
        with self._lock:
            self.last_end = max(self.last_end, now)

    def reset_times(self) -> None:
        self.first_start, self.last_end = math.inf, -math.inf


@dataclass
class Subject:
    """One library configuration, built in a worker: the decorated function and how to close it."""

    mode: str  # "sync" (threads) or "async" (tasks)
    fn: Callable[[Any], Any]
    counter: Counter
    loop: asyncio.AbstractEventLoop | None = None
    closers: list[Callable[[], Any]] = field(default_factory=list)
    cache: TieredCache | None = None

    def close(self) -> None:
        for closer in self.closers:
            try:
                closer()
            except Exception as exc:
                print(f"  (closing: {exc!r})", file=sys.stderr)
        if self.loop is not None:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()


def _functions(counter: Counter, ms: float) -> tuple[Callable[[Any], str], Callable[[Any], Any]]:
    delay = ms / 1000.0

    def compute(x: Any) -> str:
        counter.hit()
        time.sleep(delay)
        counter.done()
        return f"value-{x}"

    async def acompute(x: Any) -> str:
        counter.hit()
        await asyncio.sleep(delay)
        counter.done()
        return f"value-{x}"

    return compute, acompute


def build_subject(spec: dict[str, Any]) -> Subject:
    lib, variant, mode = spec["lib"], spec["variant"], spec["mode"]
    url, port, ns, ttl = spec["url"], spec["port"], spec["namespace"], spec["ttl"]
    counter = Counter()
    compute, acompute = _functions(counter, spec["fn_ms"])
    loop = asyncio.new_event_loop() if mode == "async" else None
    subject = Subject(mode, compute if mode == "sync" else acompute, counter, loop)
    if lib == "none":
        return subject
    if lib == "tiercache":
        cache = TieredCache(url, namespace=ns, ttl=ttl)
        subject.cache = cache
        if loop is not None:
            subject.closers.append(lambda: loop.run_until_complete(cache.aclose()))
        subject.closers.append(cache.close)
        if not cache.ready(10):
            raise RuntimeError("tiercache: the invalidation subscriber did not connect")
        subject.fn = tiered(cache, ttl=ttl)(subject.fn)
        return subject
    assert loop is not None or lib == "dogpile"
    if lib == "cashews":
        from cashews import Cache as CashewsCache

        assert loop is not None
        cw = CashewsCache()
        cw.setup(url)
        loop.run_until_complete(cw.init())
        subject.closers.append(lambda: loop.run_until_complete(cw.close()))
        subject.fn = cw(ttl=ttl, lock=variant == "lock", prefix=ns)(acompute)
        return subject
    if lib == "aiocache":
        from aiocache import Cache as AioCache
        from aiocache import cached, cached_stampede
        from aiocache.serializers import PickleSerializer

        assert loop is not None
        deco = cached_stampede if variant == "stampede" else cached
        aio_fn = deco(
            ttl=ttl, cache=AioCache.REDIS, endpoint="127.0.0.1", port=port, namespace=ns,
            serializer=PickleSerializer(), pool_max_size=PEER_POOL,
            connection_pool_class=redis.asyncio.BlockingConnectionPool,
        )(acompute)  # fmt: skip
        subject.closers.append(lambda: loop.run_until_complete(aio_fn.cache.close()))
        subject.fn = aio_fn
        return subject
    if lib == "dogpile":
        from dogpile.cache import make_region

        pool = redis.BlockingConnectionPool(host="127.0.0.1", port=port, db=0, max_connections=PEER_POOL)
        arguments: dict[str, Any] = {"connection_pool": pool, "redis_expiration_time": ttl * 2}
        if variant == "lock":
            arguments.update(distributed_lock=True, thread_local_lock=False, lock_timeout=DOGPILE_LOCK_TIMEOUT)
        region = make_region().configure("dogpile.cache.redis", expiration_time=ttl, arguments=arguments)
        subject.closers.append(pool.disconnect)
        subject.fn = region.cache_on_arguments(namespace=ns)(compute)
        return subject
    raise ValueError(f"unknown library {lib!r}")


def _expect(conn: Connection, kind: str) -> Any:
    got, payload = conn.recv()
    if got != kind:
        raise RuntimeError(f"expected {kind!r} from the parent, got {got!r}")
    return payload


def _sleep_until(t: float) -> None:
    left = t - time.monotonic()
    if left > 0:
        time.sleep(left)


def _stampede_threads(
    fn: Callable[[Any], Any], key: str, n: int, conn: Connection
) -> tuple[list[float], list[str], float, float]:
    go = threading.Event()
    parked = [0]
    parked_lock = threading.Lock()
    ends = [math.nan] * n
    errors: list[str] = []

    def caller(i: int) -> None:
        with parked_lock:
            parked[0] += 1
        go.wait()
        try:
            fn(key)
        except Exception as exc:
            errors.append(repr(exc))
        ends[i] = time.monotonic()

    threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    # Every thread exists and has parked on `go` (creation is not timed). No Barrier: waking
    # 1,000 threads from one would still be going on at the release moment.
    while parked[0] < n:
        time.sleep(0.001)
    time.sleep(0.01)  # the last ones get from the counter into go.wait()
    conn.send(("ready", None))
    t0 = _expect(conn, "go")
    _sleep_until(t0)
    released = time.monotonic()
    go.set()
    deadline = released + TRIAL_TIMEOUT
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return ends, errors, t0, released


async def _stampede_tasks(
    fn: Callable[[Any], Any], key: str, n: int, conn: Connection
) -> tuple[list[float], list[str], float, float]:
    go = asyncio.Event()
    ends = [math.nan] * n
    errors: list[str] = []

    async def caller(i: int) -> None:
        await go.wait()
        try:
            await fn(key)
        except Exception as exc:
            errors.append(repr(exc))
        ends[i] = time.monotonic()

    tasks = [asyncio.create_task(caller(i)) for i in range(n)]
    await asyncio.sleep(0)  # every task runs up to `go.wait()`
    conn.send(("ready", None))
    t0 = _expect(conn, "go")  # blocks the loop, which has nothing else to do now
    await asyncio.sleep(max(0.0, t0 - time.monotonic()))
    released = time.monotonic()
    go.set()
    _, pending = await asyncio.wait(tasks, timeout=TRIAL_TIMEOUT)
    for task in pending:
        task.cancel()
    return ends, errors, t0, released


def run_stampede(subject: Subject, key: str, n: int, conn: Connection) -> dict[str, Any]:
    gc.collect()
    LOGS.take()
    before = subject.counter.n
    subject.counter.reset_times()
    if subject.mode == "sync":
        ends, errors, t0, released = _stampede_threads(subject.fn, key, n, conn)
    else:
        assert subject.loop is not None
        ends, errors, t0, released = subject.loop.run_until_complete(_stampede_tasks(subject.fn, key, n, conn))
    logged, first_log = LOGS.take()
    return {
        "calls": subject.counter.n - before,
        "logged": logged,
        "first_log": first_log,
        "ends_ms": [(e - t0) * 1e3 for e in ends if not math.isnan(e)],
        "hung": sum(1 for e in ends if math.isnan(e)),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "late_ms": (released - t0) * 1e3,
        "fn_start_ms": (subject.counter.first_start - t0) * 1e3,  # inf: no call in this process
        "fn_end_ms": (subject.counter.last_end - t0) * 1e3,
    }


def run_zipf(subject: Subject, trace: list[int], callers: int) -> dict[str, Any]:
    gc.collect()
    LOGS.take()
    before = subject.counter.n
    with _ROUND_TRIPS_LOCK:
        _ROUND_TRIPS[0] = 0
    errors: list[str] = []
    latencies: list[list[float]] = [[] for _ in range(callers)]
    it = iter(trace)  # next() on a list iterator is one C call: atomic under the GIL
    perf = time.perf_counter
    if subject.mode == "sync":
        go = threading.Event()
        parked = [0]
        parked_lock = threading.Lock()
        fn = subject.fn

        def worker(i: int) -> None:
            lat = latencies[i]
            with parked_lock:
                parked[0] += 1
            go.wait()
            for x in it:
                t = perf()
                try:
                    fn(x)
                except Exception as exc:
                    errors.append(repr(exc))
                lat.append(perf() - t)

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(callers)]
        for t in threads:
            t.start()
        while parked[0] < callers:  # as in _stampede_threads: every thread parked, no Barrier
            time.sleep(0.001)
        time.sleep(0.01)
        t0 = perf()
        go.set()
        for t in threads:
            t.join()
        wall = perf() - t0
    else:
        assert subject.loop is not None
        afn = subject.fn

        async def aworker(i: int) -> None:
            lat = latencies[i]
            for x in it:
                t = perf()
                try:
                    await afn(x)
                except Exception as exc:
                    errors.append(repr(exc))
                lat.append(perf() - t)

        async def main() -> float:
            t0 = perf()
            await asyncio.gather(*(aworker(i) for i in range(callers)))
            return perf() - t0

        wall = subject.loop.run_until_complete(main())
    with _ROUND_TRIPS_LOCK:
        round_trips = _ROUND_TRIPS[0]
    flat = [x for lat in latencies for x in lat]
    logged, first_log = LOGS.take()
    return {
        "calls": subject.counter.n - before,
        "logged": logged,
        "first_log": first_log,
        "wall_s": wall,
        "round_trips": round_trips,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "p50_ms": percentile(flat, 50) * 1e3,
        "p99_ms": percentile(flat, 99) * 1e3,
    }


def _stats(subject: Subject | None) -> dict[str, Any] | None:
    if subject is None or subject.cache is None:
        return None
    s = subject.cache.stats()
    names = ("l1_hits", "l2_hits", "misses", "loads", "lease_waits", "lease_timeouts", "in_flight", "backend_errors")
    return {name: getattr(s, name) for name in names}


def worker_main(conn: Connection, index: int) -> None:
    """A worker process: builds one subject at a time and runs what the parent asks."""
    harness.die_with_parent()  # gone with the benchmark, even if it is killed outright
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops us
    _count_round_trips()
    logging.getLogger().addHandler(LOGS)  # counted, not printed (see LogCounter)
    subject: Subject | None = None
    conn.send(("hello", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        op = msg[0]
        try:
            if op == "exit":
                if subject is not None:
                    subject.close()
                conn.send(("ok", None))
                return
            if op == "build":
                if subject is not None:
                    subject.close()
                    subject = None
                subject = build_subject(msg[1])
                conn.send(("ok", None))
            elif op == "close":
                stats = _stats(subject)
                if subject is not None:
                    subject.close()
                subject = None
                conn.send(("ok", stats))
            elif op == "stampede":
                assert subject is not None
                conn.send(("ok", run_stampede(subject, msg[1], msg[2], conn)))
            elif op == "zipf":
                assert subject is not None
                conn.send(("ok", run_zipf(subject, msg[1], msg[2])))
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception:
            conn.send(("error", f"worker {index}: {traceback.format_exc()}"))


class WorkerError(RuntimeError):
    pass


class Pool:
    """Worker processes started once (spawn); the 1-process rows use the first one."""

    def __init__(self, n: int) -> None:
        self.ctx = mp.get_context("spawn")
        self.n = n
        self.procs: list[Any] = []
        self.conns: list[Connection] = []
        self.start()

    def start(self) -> None:
        for i in range(self.n):
            parent, child = self.ctx.Pipe()
            proc = self.ctx.Process(target=worker_main, args=(child, i), daemon=True, name=f"bench-stampede-{i}")
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        for conn in self.conns:
            self.recv(conn, 60, "hello")

    @staticmethod
    def recv(conn: Connection, timeout: float, what: str) -> Any:
        if not conn.poll(timeout):
            raise WorkerError(f"a worker did not answer {what!r} within {timeout:.0f} s")
        kind, payload = conn.recv()
        if kind == "error":
            raise WorkerError(payload)
        return payload

    def each(self, k: int, msg: tuple[Any, ...], timeout: float = 60) -> list[Any]:
        for conn in self.conns[:k]:
            conn.send(msg)
        return [self.recv(conn, timeout, msg[0]) for conn in self.conns[:k]]

    def stampede(self, k: int, key: str, per_worker: int, lead: float) -> list[dict[str, Any]]:
        conns = self.conns[:k]
        for conn in conns:
            conn.send(("stampede", key, per_worker))
        for conn in conns:
            self.recv(conn, 60, "ready")
        t0 = time.monotonic() + lead  # the common release moment
        for conn in conns:
            conn.send(("go", t0))
        return [self.recv(conn, TRIAL_TIMEOUT + 30, "stampede") for conn in conns]

    def stop(self) -> None:
        for conn in self.conns:
            try:
                conn.send(("exit",))
            except (OSError, ValueError):
                pass
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()  # SIGTERM to that pid only
                proc.join(5)
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []

    def restart(self) -> None:
        self.stop()
        self.start()


# -- the parent: rows, runs, tables ------------------------------------------------------------


@dataclass
class Config:
    key: str
    label: str
    lib: str
    variant: str
    mode: str


CONFIGS = [
    Config("floor.threads", "no cache: the bare function (floor), threads", "none", "", "sync"),
    Config("floor.tasks", "no cache: the bare function (floor), tasks", "none", "", "async"),
    Config("tiercache.sync", "tiercache @tiered, sync (threads)", "tiercache", "", "sync"),
    Config("tiercache.async", "tiercache @tiered, async (tasks)", "tiercache", "", "async"),
    Config("cashews.lock", "cashews @cache(lock=True)", "cashews", "lock", "async"),
    Config("cashews.default", "cashews @cache (default: no lock)", "cashews", "", "async"),
    Config("aiocache.stampede", "aiocache @cached_stampede (lease=2)", "aiocache", "stampede", "async"),
    Config("aiocache.cached", "aiocache @cached", "aiocache", "", "async"),
    Config("dogpile.lock", "dogpile.cache, distributed_lock=True (threads)", "dogpile", "lock", "sync"),
    Config("dogpile.default", "dogpile.cache, default mutex (threads)", "dogpile", "", "sync"),
]
ZIPF_CONFIGS = [c for c in CONFIGS if c.lib != "none"]
TIERCACHE_ROWS = ("tiercache.sync", "tiercache.async")
ADMIN_COMMANDS = ("info", "flushall")  # and CONFIG ...: the benchmark's own


@dataclass
class StampedeRow:
    config: Config
    procs: int
    per_worker: int
    trials: list[list[dict[str, Any]]] = field(default_factory=list)  # per trial, per process
    commands: dict[str, int] = field(default_factory=dict)
    stats: list[dict[str, Any] | None] = field(default_factory=list)
    skipped: str = ""

    def calls(self) -> list[int]:
        return [sum(p["calls"] for p in trial) for trial in self.trials]

    def walls(self) -> list[float]:
        """Per trial: the last answer of the slowest process, ms after the release moment
        (inf if a caller hung)."""
        out = []
        for trial in self.trials:
            if any(p["hung"] for p in trial):
                out.append(math.inf)
            else:
                out.append(max(max(p["ends_ms"]) for p in trial))
        return out

    def got_value(self) -> list[float]:
        """Per trial: when the slowest process answered its first caller (every process had
        the value by then; with 1 process, the first answer)."""
        return [max(min(p["ends_ms"] or [math.inf]) for p in trial) for trial in self.trials]

    def fn_times(self) -> tuple[list[float], list[float]]:
        """Per trial: when the function first started (any process) and last returned."""
        starts = [min(p["fn_start_ms"] for p in trial) for trial in self.trials]
        ends = [max(p["fn_end_ms"] for p in trial) for trial in self.trials]
        return starts, ends

    def caller_p50s(self) -> list[float]:
        return [statistics.median([e for p in trial for e in p["ends_ms"]] or [math.inf]) for trial in self.trials]


def server_commands(client: redis.Redis) -> dict[str, int]:
    """The workload's commands (the benchmark's own INFO, FLUSHALL and CONFIG ... left out)."""
    return {
        name: calls
        for name, calls in harness.commandstats(client).items()
        if name not in ADMIN_COMMANDS and not name.startswith("config")
    }


def _spec(config: Config, server: RedisServer, namespace: str, fn_ms: float) -> dict[str, Any]:
    return {
        "lib": config.lib,
        "variant": config.variant,
        "mode": config.mode,
        "url": server.url,
        "port": server.port,
        "namespace": namespace,
        "ttl": TTL,
        "fn_ms": fn_ms,
    }


def run_stampede_row(
    pool: Pool,
    server: RedisServer,
    admin: redis.Redis,
    config: Config,
    procs: int,
    callers: int,
    trials: int,
    budget: float,
    fn_ms: float,
    nonce: str,
) -> StampedeRow:
    row = StampedeRow(config, procs, callers // procs)
    namespace = f"bst-{nonce}-{config.key.replace('.', '-')}-{procs}p"
    admin.flushall()
    try:
        pool.each(procs, ("build", _spec(config, server, namespace, fn_ms)))
    except WorkerError as exc:
        if "ModuleNotFoundError" in str(exc) or "ImportError" in str(exc):
            row.skipped = f"not installed: {str(exc).strip().splitlines()[-1]}"
            pool.each(procs, ("close",))
            return row
        raise
    admin.config_resetstat()
    started = time.monotonic()
    for t in range(trials):
        key = f"{nonce}-{config.key}-{procs}p-trial{t}"  # a cold key per trial
        row.trials.append(pool.stampede(procs, key, row.per_worker, lead=0.02 if procs > 1 else 0.005))
        if any(p["hung"] for p in row.trials[-1]):
            break  # callers still stuck after TRIAL_TIMEOUT: no point in more trials
        if t + 1 >= min(3, trials) and time.monotonic() - started > budget:
            break  # a slow row (polling locks): fewer trials, said in the table
    row.commands = server_commands(admin)
    row.stats = pool.each(procs, ("close",))
    if any(p["hung"] for trial in row.trials for p in trial):
        pool.restart()  # the hung threads or tasks would disturb the next rows
    return row


@dataclass
class ZipfRow:
    config: Config
    result: dict[str, Any] = field(default_factory=dict)
    commands: dict[str, int] = field(default_factory=dict)
    stats: dict[str, Any] | None = None
    skipped: str = ""


def run_zipf_row(
    pool: Pool, server: RedisServer, admin: redis.Redis, config: Config, trace: list[int], callers: int, fn_ms: float
) -> ZipfRow:
    row = ZipfRow(config)
    admin.flushall()  # every library starts with an empty Redis
    try:
        pool.each(1, ("build", _spec(config, server, f"bzipf-{config.key.replace('.', '-')}", fn_ms)))
    except WorkerError as exc:
        if "ModuleNotFoundError" in str(exc) or "ImportError" in str(exc):
            row.skipped = f"not installed: {str(exc).strip().splitlines()[-1]}"
            pool.each(1, ("close",))
            return row
        raise
    admin.config_resetstat()
    row.result = pool.each(1, ("zipf", trace, callers), timeout=ZIPF_TIMEOUT)[0]
    row.commands = server_commands(admin)
    row.stats = pool.each(1, ("close",))[0]
    return row


def zipf_trace(requests: int, keys: int, s: float, seed: int) -> list[int]:
    cum = list(itertools.accumulate(1.0 / (k**s) for k in range(1, keys + 1)))
    return random.Random(seed).choices(range(keys), cum_weights=cum, k=requests)


# -- report ------------------------------------------------------------------------------------


def _calls_cell(calls: list[int]) -> str:
    if not calls:
        return "-"
    lo, hi, med = min(calls), max(calls), statistics.median(calls)
    return f"{lo:,}" if lo == hi else f"{med:,.0f} [{lo:,}-{hi:,}]"


def _ms(v: float) -> str:
    return "hung" if math.isinf(v) else f"{v:,.1f}"


def report_stampede(rows: list[StampedeRow], fn_ms: float) -> list[dict[str, Any]]:
    header = (
        f"  {'case':<48} {'fn calls/trial':>16} {'got value':>9} {'caller p50':>10} {'wall med':>9} {'wall max':>9} "
        f"{'Redis cmds/trial':>16} {'late':>5} {'trials':>6}"
    )
    for procs in sorted({r.procs for r in rows}):
        group = [r for r in rows if r.procs == procs]
        per = group[0].per_worker
        if procs == 1:
            title = f"A1. Stampede: 1 process x {per:,} callers of one cold key, {fn_ms:g} ms function"
        else:
            title = (
                f"A{procs}. Stampede: {procs} processes x {per:,} callers of one cold key, {fn_ms:g} ms function "
                f"(fn calls: total over processes; wall: slowest process)"
            )
        print(
            f"\n{title}\n  ms from the common release moment (medians over trials): got value: the slowest process's "
            f"first answer;\n  caller p50: the median caller's answer; wall: the last answer (median, worst trial); "
            f"late: the latest a\n  process released its callers (included in the times)"
            f"\n{header}"
        )
        print(f"  {'-' * (len(header) - 2)}")
        for r in group:
            if r.skipped:
                print(f"  {r.config.label:<48} skipped: {r.skipped}")
                continue
            walls, p50s = r.walls(), r.caller_p50s()
            n = len(r.trials)
            cmds = sum(r.commands.values()) / n if n else 0
            late = max(p["late_ms"] for trial in r.trials for p in trial)
            print(
                f"  {r.config.label:<48} {_calls_cell(r.calls()):>16} {_ms(statistics.median(r.got_value())):>9} "
                f"{_ms(statistics.median(p50s)):>10} {_ms(statistics.median(walls)):>9} {_ms(max(walls)):>9} "
                f"{cmds:>16,.0f} {late:>5.1f} {n:>6}"
            )
            problems = [(i, p) for i, trial in enumerate(r.trials) for p in trial if p["errors"] or p["hung"]]
            for i, p in problems[:3]:
                print(f"  {'':<48}   trial {i}: {p['errors']} errors ({p['first_error']}), {p['hung']} hung")
            logged = sum(p["logged"] for trial in r.trials for p in trial)
            if logged:
                first = next(p["first_log"] for trial in r.trials for p in trial if p["first_log"])
                print(f"  {'':<48}   {logged:,} log records >= WARNING, the first: {first}")
    print("\n  Redis commands per trial, by command (INFO commandstats; Lua-internal calls included):")
    for r in rows:
        if r.commands and r.trials:
            top = sorted(r.commands.items(), key=lambda kv: -kv[1])[:6]
            cells = ", ".join(f"{name} {calls / len(r.trials):,.1f}" for name, calls in top)
            print(f"    {r.config.label} [{r.procs}p]: {cells}")
    print("\n  tiercache counters after the trials (summed over processes):")
    for r in rows:
        if r.config.lib == "tiercache" and r.stats:
            total: dict[str, int] = {}
            for s in r.stats:
                for k, v in (s or {}).items():
                    total[k] = total.get(k, 0) + v
            print(f"    {r.config.label} [{r.procs}p]: " + ", ".join(f"{k}={v:,}" for k, v in total.items()))

    print("\n  Timeline, ms after the release (medians): function started / returned -> got value -> last answer")
    for r in rows:
        if r.config.lib in ("tiercache", "none") and r.trials:
            starts, ends = r.fn_times()
            print(
                f"    {r.config.label} [{r.procs}p]: {statistics.median(starts):.1f} / {statistics.median(ends):.1f}"
                f" -> {statistics.median(r.got_value()):.1f} -> {statistics.median(r.walls()):.1f}"
            )

    verdicts = []
    floors = {(r.config.key, r.procs): r for r in rows if r.config.lib == "none" and r.trials}
    print("\nTargets (stampede)")
    for r in rows:
        if r.config.key not in TIERCACHE_ROWS or not r.trials:
            continue
        calls, walls = r.calls(), r.walls()
        one = all(c == 1 for c in calls)
        med = statistics.median(walls)
        fast = med <= fn_ms + TIERCACHE_SLACK_MS
        floor = floors.get(("floor.threads" if r.config.mode == "sync" else "floor.tasks", r.procs))
        floor_wall = statistics.median(floor.walls()) if floor else math.nan
        floor_note = f"; bare-function floor {_ms(floor_wall)} ms ({med - floor_wall:+.1f})" if floor else ""
        where = f"{r.procs} process{'es' if r.procs > 1 else ''}"
        text1 = f"{r.config.label}, {where}: exactly 1 function call per trial"
        text2 = f"{r.config.label}, {where}: wall <= {fn_ms + TIERCACHE_SLACK_MS:g} ms (median)"
        verdicts.append(harness.verdict(text1, one, f"calls {_calls_cell(calls)}", calls, width=78))
        verdicts.append(harness.verdict(text2, fast, f"{_ms(med)} ms{floor_note}", med, width=78))
    return verdicts


def report_zipf(rows: list[ZipfRow], params: dict[str, Any]) -> list[dict[str, Any]]:
    print(
        f"\nB. Zipf trace: {params['requests']:,} requests over {params['keys']:,} keys (s={params['s']:g}, "
        f"seed {params['seed']}; {params['distinct']:,} distinct keys = the ideal function calls), "
        f"{params['callers']} concurrent callers, {params['fn_ms']:g} ms function, 1 process, Redis emptied "
        f"before each library"
    )
    print(
        "  round trips: requests redis-py wrote to a socket in the process (a pipeline is one); "
        "server cmds: INFO commandstats (each pipelined command and each Lua redis.call counts)"
    )
    header = (
        f"  {'case':<48} {'fn calls':>9} {'round trips':>12} {'server cmds':>12} {'wall s':>8} {'req/s':>9} "
        f"{'p50 ms':>8} {'p99 ms':>8}"
    )
    print(f"{header}\n  {'-' * (len(header) - 2)}")
    for r in rows:
        if r.skipped:
            print(f"  {r.config.label:<48} skipped: {r.skipped}")
            continue
        z = r.result
        print(
            f"  {r.config.label:<48} {z['calls']:>9,} {z['round_trips']:>12,} {sum(r.commands.values()):>12,} "
            f"{z['wall_s']:>8.2f} {params['requests'] / z['wall_s']:>9,.0f} {z['p50_ms']:>8.3f} {z['p99_ms']:>8.1f}"
        )
        if z["errors"]:
            print(f"  {'':<48}   {z['errors']} errors, the first: {z['first_error']}")
        if z["logged"]:
            print(f"  {'':<48}   {z['logged']:,} log records >= WARNING, the first: {z['first_log']}")
    print("\n  server commands by command:")
    for r in rows:
        if r.commands:
            top = sorted(r.commands.items(), key=lambda kv: -kv[1])[:7]
            print(f"    {r.config.label}: " + ", ".join(f"{name} {calls:,}" for name, calls in top))
    for r in rows:
        if r.stats:
            print(f"  tiercache counters, {r.config.label}: " + ", ".join(f"{k}={v:,}" for k, v in r.stats.items()))

    verdicts: list[dict[str, Any]] = []
    done = [r for r in rows if r.result]
    peers = [r for r in done if r.config.lib != "tiercache"]
    print("\nTargets (Zipf)")
    if not peers:
        return verdicts
    fewest = min(r.result["calls"] for r in peers)
    fastest = min(r.result["wall_s"] for r in peers)
    for r in done:
        if r.config.lib != "tiercache":
            continue
        calls, wall = r.result["calls"], r.result["wall_s"]
        t1 = f"{r.config.label}: fewest function calls (peers' best: {fewest:,})"
        t2 = f"{r.config.label}: lowest wall time (peers' best: {fastest:.2f} s)"
        verdicts.append(harness.verdict(t1, calls <= fewest, f"{calls:,}", calls, width=78))
        verdicts.append(harness.verdict(t2, wall < fastest, f"{wall:.2f} s", wall, width=78))
    return verdicts


# -- main --------------------------------------------------------------------------------------


def _progress(what: str, t_start: float) -> None:
    harness.progress(f"  {time.monotonic() - t_start:6.1f} s  {what} ...")


def json_doc(
    meta: dict[str, Any],
    stampede_rows: list[StampedeRow],
    zipf_rows: list[ZipfRow],
    zparams: dict[str, Any],
    verdicts: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "meta": meta,
        "stampede": [
            {
                "case": r.config.key,
                "label": r.config.label,
                "procs": r.procs,
                "callers_per_process": r.per_worker,
                "skipped": r.skipped or None,
                "calls": r.calls(),
                "wall_ms": r.walls(),
                "got_value_ms": r.got_value(),
                "fn_start_ms": r.fn_times()[0],
                "fn_end_ms": r.fn_times()[1],
                "caller_p50_ms": r.caller_p50s(),
                "redis_commands": r.commands,
                "tiercache_stats": r.stats,
            }
            for r in stampede_rows
        ],
        "zipf": {
            "params": zparams,
            "rows": [
                {"case": r.config.key, "label": r.config.label, "skipped": r.skipped or None, **r.result}
                | {"redis_commands": r.commands, "tiercache_stats": r.stats}
                for r in zipf_rows
            ],
        },
        "targets": verdicts,
    }


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__, quick="a smoke test: everything scaled down (~12 s)")
    parser.add_argument("--only", default="stampede,zipf", help="comma-separated parts: stampede,zipf")
    parser.add_argument(
        "--cases", default="", help="comma-separated case prefixes to run, e.g. floor,tiercache (default: all)"
    )
    parser.add_argument("--callers", type=int, help="stampede: concurrent callers in all (default 1000, quick 40)")
    parser.add_argument("--procs", type=int, default=4, help="stampede: processes of the multi-process rows")
    parser.add_argument("--trials", type=int, help="stampede: trials per row, a new key each (default 9, quick 2)")
    parser.add_argument("--row-budget", type=float, help="stampede: seconds after which a row stops at 3 trials")
    parser.add_argument("--fn-ms", type=float, default=50.0, help="the function's time in ms (default 50)")
    parser.add_argument("--zipf-requests", type=int, help="default 100000 (quick 1000)")
    parser.add_argument("--zipf-keys", type=int, help="default 20000 (quick 200)")
    parser.add_argument("--zipf-s", type=float, default=1.0, help="Zipf exponent (default 1.0)")
    parser.add_argument("--zipf-callers", type=int, help="default 200 (quick 40)")
    parser.add_argument("--seed", type=int, default=20240611)
    args = harness.parse(parser, argv)
    quick = args.quick
    callers = args.callers or (40 if quick else 1000)
    trials = args.trials or (2 if quick else 9)
    budget = args.row_budget if args.row_budget is not None else (1.0 if quick else 20.0)
    z_requests = args.zipf_requests or (1000 if quick else 100_000)
    z_keys = args.zipf_keys or (200 if quick else 20_000)
    z_callers = args.zipf_callers or (40 if quick else 200)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    prefixes = tuple(c.strip() for c in args.cases.split(",") if c.strip())
    configs = [c for c in CONFIGS if not prefixes or c.key.startswith(prefixes)]
    zipf_configs = [c for c in ZIPF_CONFIGS if not prefixes or c.key.startswith(prefixes)]
    if unknown := set(parts) - {"stampede", "zipf"}:
        parser.error(f"unknown parts: {sorted(unknown)}")
    if callers % args.procs:
        parser.error(f"--callers {callers} must be a multiple of --procs {args.procs}")

    pool: Pool | None = None
    t_start = time.monotonic()
    nonce = secrets.token_hex(3)
    with harness.redis_server(args.redis_server) as server:
        try:
            admin = server.client()
            meta = harness.environment(server)
            harness.header(
                "tiercache stampede benchmark",
                meta,
                method=(
                    f"{'--quick' if quick else 'full'} run; stampede: {callers:,} callers, 1 process and "
                    f"{args.procs} x {callers // args.procs:,}, up to {trials} trials per row (median; a new key "
                    f"each); function {args.fn_ms:g} ms; TTL {TTL} s for every library"
                ),
                pools=POOL_NOTE,
            )
            _progress("[workers] starting", t_start)
            pool = Pool(max(args.procs, 1))
            stampede_rows: list[StampedeRow] = []
            zipf_rows: list[ZipfRow] = []
            zparams: dict[str, Any] = {}
            if "stampede" in parts:
                for procs in (1, args.procs) if args.procs > 1 else (1,):
                    for config in configs:
                        _progress(f"[stampede] {config.label}, {procs} process(es)", t_start)
                        try:
                            row = run_stampede_row(
                                pool, server, admin, config, procs, callers, trials, budget, args.fn_ms, nonce
                            )
                        except WorkerError as exc:
                            row = StampedeRow(config, procs, callers // procs, skipped=f"FAILED: {str(exc)[-600:]}")
                            pool.restart()
                        stampede_rows.append(row)
            if "zipf" in parts:
                trace = zipf_trace(z_requests, z_keys, args.zipf_s, args.seed)
                zparams = {
                    "requests": z_requests,
                    "keys": z_keys,
                    "s": args.zipf_s,
                    "seed": args.seed,
                    "distinct": len(set(trace)),
                    "callers": z_callers,
                    "fn_ms": args.fn_ms,
                }
                for config in zipf_configs:
                    _progress(f"[zipf] {config.label}", t_start)
                    try:
                        zipf_rows.append(run_zipf_row(pool, server, admin, config, trace, z_callers, args.fn_ms))
                    except WorkerError as exc:
                        zipf_rows.append(ZipfRow(config, skipped=f"FAILED: {str(exc)[-600:]}"))
                        pool.restart()
            verdicts: list[dict[str, Any]] = []
            if stampede_rows:
                verdicts += report_stampede(stampede_rows, args.fn_ms)
            if zipf_rows:
                verdicts += report_zipf(zipf_rows, zparams)
            meta.update(quick=quick, **harness.footer(meta, t_start))
            if args.json:
                harness.write_json(args.json, json_doc(meta, stampede_rows, zipf_rows, zparams, verdicts))
        finally:
            if pool is not None:
                pool.stop()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)

"""Coherence benchmark: how fast an invalidation reaches other processes, and what the bus costs.

Starts its own throwaway redis-server on a free loopback port, then:

1. propagation latency: a writer process invalidates a key at a fixed rate (default 1,000/s);
   3 reader processes record when their subscriber *applied* each message (CLOCK_MONOTONIC,
   shared by all processes on Linux). Latency = applied - the moment the writer called
   ``invalidate``. Once with idle readers, once with readers busy calling a @tiered function
   on their main thread (competing with the subscriber thread for the GIL).
2. stale reads: readers call a @tiered function over a truth counter while the writer bumps it
   and invalidates; calls that started after ``invalidate`` returned and still saw the old value.
3. ``wait=True`` latency: invalidate and wait for every subscriber's acknowledgement.
4. the throughput cost of coherence: L1-hit calls/s with the bus on and with ``coherent=False``,
   and the miss path in each.

Usage: python benchmarks/bench_coherence.py [--quick] [--rate 1000] [--seconds 3] [--json PATH]
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections.abc import Iterator
from typing import Any

import harness
import redis
from harness import percentile

from tiercache import TieredCache, tiered

# -- processes -----------------------------------------------------------------------------


def reader(url: str, namespace: str, busy: bool, switch: float | None, stop: Any, ready: Any, results: Any) -> None:
    """Records when each invalidation message was applied by this process's subscriber, until
    ``stop`` is set (after the writer's last message: a fixed window would end early for a
    reader that started before the others on a loaded machine, and count messages as lost)."""
    if switch is not None:
        sys.setswitchinterval(switch)
    cache = TieredCache(url, namespace=namespace)
    bus = cache._core.bus
    assert bus is not None
    applied: dict[int, float] = {}
    handle = bus.handle

    def timed_handle(payloads: Any) -> Any:
        acks = handle(payloads)
        now = time.monotonic()
        for payload in payloads:
            seq = json.loads(payload).get("s")
            if seq is not None:  # fill announcements are not numbered
                applied[seq] = now
        return acks

    bus.handle = timed_handle  # type: ignore[method-assign]
    cache.ready(10)

    @tiered(cache, name="bench.busy")
    def work(x: int) -> int:
        return x

    ready.put(1)
    started = time.monotonic()
    calls = 0
    while not stop.is_set():
        if busy:
            for i in range(1000):
                work(i % 100)
            calls += 1000
        else:
            time.sleep(0.01)
    results.put({"applied": applied, "busy_calls": calls, "seconds": time.monotonic() - started})
    cache.close()


@contextlib.contextmanager
def processes(target: Any, n: int, *args: Any) -> Iterator[tuple[Any, Any]]:
    """``n`` spawned processes running ``target(*args, stop, ready, results)``; yields
    ``(stop, results)`` once each has put on ``ready``. On the way out ``stop`` is set and they
    are joined (terminated past 30 s), also when the caller failed: never left behind."""
    ctx = mp.get_context("spawn")
    ready, results, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=target, args=(*args, stop, ready, results)) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            ready.get(timeout=30)
        yield stop, results
    finally:
        stop.set()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.terminate()


def _timed_writes(
    url: str, namespace: str, rate: int, seconds: float, stop: Any, results: Any, readers: int
) -> tuple[dict[int, float], list[Any]]:
    """Invalidate at ``rate`` for ``seconds``: when each message was sent (by sequence number),
    and the readers' records, taken once the last messages had a second to land."""
    writer = TieredCache(url, namespace=namespace)
    writer.ready(10)
    sent: dict[int, float] = {}
    interval = 1.0 / rate
    next_at = time.monotonic()
    end = next_at + seconds
    try:
        while next_at < end:
            now = time.monotonic()
            if now < next_at:
                time.sleep(max(0.0, next_at - now - 0.0002))
                while time.monotonic() < next_at:
                    pass
            started = time.monotonic()
            seq = writer.invalidate(f"tc:{namespace}:v1:k:{{x}}").seq
            if seq is not None:
                sent[seq] = started
            next_at += interval
        time.sleep(1.0)  # the last messages land
        stop.set()
        return sent, [results.get(timeout=60) for _ in range(readers)]
    finally:
        writer.close()


def run_latency(
    url: str, rate: int, seconds: float, busy: bool, readers: int = 3, switch: float | None = None
) -> dict[str, Any]:
    namespace = f"lat{os.getpid()}{int(busy)}"
    with processes(reader, readers, url, namespace, busy, switch) as (stop, results):
        sent, outs = _timed_writes(url, namespace, rate, seconds, stop, results, readers)
    achieved = len(sent) / seconds
    latencies = [(t - sent[seq]) * 1e3 for out in outs for seq, t in out["applied"].items() if seq in sent]
    missing = sum(1 for out in outs for seq in sent if seq not in out["applied"])
    return {
        "busy": busy,
        "readers": readers,
        "switch_interval": switch,
        "rate_target": rate,
        "rate_achieved": round(achieved),
        "samples": len(latencies),
        "not_applied": missing,
        "p50_ms": round(statistics.median(latencies), 3),
        "p99_ms": round(percentile(latencies, 99), 3),
        "max_ms": round(max(latencies), 3),
        "reader_calls_per_s": round(sum(o["busy_calls"] / o["seconds"] for o in outs)),
    }


def stale_reader(
    url: str, truth_port: int, namespace: str, seconds: float, stop: Any, ready: Any, results: Any
) -> None:
    """Reads for ``seconds`` (``stop`` is for the readers of ``processes`` that run until told)."""
    truth = redis.Redis(port=truth_port)
    cache = TieredCache(url, namespace=namespace)

    @tiered(cache, name="bench.truth")
    def read(k: int) -> int:
        return int(truth.get(f"truth:{namespace}") or 0)

    cache.ready(10)
    read(0)
    ready.put(1)
    last_start: dict[int, float] = {}
    end = time.monotonic() + seconds + 0.5
    while time.monotonic() < end:
        t = time.monotonic()
        last_start[read(0)] = t
    results.put({"last_start": last_start, "l1_hits": cache.stats().l1_hits})
    cache.close()


def _bump_and_invalidate(
    server: harness.RedisServer, namespace: str, seconds: float, results: Any, readers: int
) -> tuple[dict[int, float], list[Any]]:
    """Bump the truth counter and invalidate, about every 2 ms for ``seconds``: when each
    version's invalidation returned, and the readers' records."""
    truth = redis.Redis(port=server.port)
    writer = TieredCache(server.url, namespace=namespace)
    writer.ready(10)

    @tiered(writer, name="bench.truth")
    def read(k: int) -> int:
        raise AssertionError

    key = read.key(0)
    returned: dict[int, float] = {}
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            version = int(truth.incr(f"truth:{namespace}"))
            writer.invalidate(key)
            returned[version] = time.monotonic()
            time.sleep(0.002)
        return returned, [results.get(timeout=60) for _ in range(readers)]
    finally:
        writer.close()
        truth.close()


def run_stale(server: harness.RedisServer, seconds: float, readers: int = 3) -> dict[str, Any]:
    namespace = f"stale{os.getpid()}"
    with processes(stale_reader, readers, server.url, server.port, namespace, seconds) as (_, results):
        returned, outs = _bump_and_invalidate(server, namespace, seconds, results, readers)
    lateness = []
    for out in outs:
        for value, start in out["last_start"].items():
            newer = returned.get(int(value) + 1)
            if newer is not None and start > newer:
                lateness.append((start - newer) * 1e3)
    return {
        "invalidations": len(returned),
        "reader_l1_hits": sum(o["l1_hits"] for o in outs),
        "calls_started_after_return_with_old_value": len(lateness),
        "worst_lateness_ms": round(max(lateness), 3) if lateness else 0.0,
    }


def run_wait(url: str, n: int, readers: int = 3) -> dict[str, Any]:
    namespace = f"wait{os.getpid()}"
    others = [TieredCache(url, namespace=namespace) for _ in range(readers)]
    writer = TieredCache(url, namespace=namespace)
    for c in [*others, writer]:
        c.ready(10)
    plain, waited = [], []
    complete = 0
    for i in range(n):
        key = f"tc:{namespace}:v1:k:{{w{i % 50}}}"
        t = time.perf_counter()
        writer.invalidate(key)
        plain.append((time.perf_counter() - t) * 1e6)
        t = time.perf_counter()
        result = writer.invalidate(key, wait=True)
        waited.append((time.perf_counter() - t) * 1e6)
        complete += result.complete
    for c in [*others, writer]:
        c.close()
    return {
        "subscribers": readers + 1,
        "invalidate_p50_us": round(statistics.median(plain), 1),
        "invalidate_wait_p50_us": round(statistics.median(waited), 1),
        "invalidate_wait_p99_us": round(percentile(waited, 99), 1),
        "complete": f"{complete}/{n}",
    }


def run_wait_busy(url: str, n: int, readers: int = 2, timeout: float = 0.2) -> dict[str, Any]:
    """``wait=True`` against busy reader processes (a CPU-bound thread calling a ``@tiered``
    function, so their callers poll the subscriber socket): each write waits for every
    reader's acknowledgement, at most ``timeout``."""
    namespace = f"waitbusy{os.getpid()}"
    waited = []
    complete = 0
    with processes(reader, readers, url, namespace, True, None):
        writer = TieredCache(url, namespace=namespace)
        try:
            writer.ready(10)
            for i in range(n):
                t = time.perf_counter()
                result = writer.invalidate(f"tc:{namespace}:v1:k:{{w{i % 50}}}", wait=True, timeout=timeout)
                waited.append((time.perf_counter() - t) * 1e3)
                complete += result.complete
                time.sleep(0.01)
        finally:
            writer.close()
    return {
        "busy_readers": readers,
        "timeout_s": timeout,
        "wait_p50_ms": round(statistics.median(waited), 2),
        "wait_p99_ms": round(percentile(waited, 99), 2),
        "wait_max_ms": round(max(waited), 2),
        "complete": f"{complete}/{n}",
    }


def run_throughput(url: str, seconds: float) -> dict[str, Any]:
    """L1 hits/s and miss latency with the bus and without (coherent=False), in alternating
    rounds so that the machine's noise falls on both alike."""
    fns: dict[str, Any] = {}
    caches = []
    for coherent in (True, False):
        cache = TieredCache(url, namespace=f"tp{os.getpid()}{int(coherent)}", coherent=coherent)
        cache.ready(10)
        caches.append(cache)

        @tiered(cache)
        def f(x: int) -> int:
            return x

        for i in range(100):
            f(i)
        fns["bus" if coherent else "no_bus"] = f
    hits: dict[str, list[float]] = {name: [] for name in fns}
    miss: dict[str, list[float]] = {name: [] for name in fns}
    for rnd in range(9):
        for name, f in fns.items():
            n = 0
            t = time.perf_counter()
            while time.perf_counter() - t < seconds / 18:
                for i in range(100):
                    f(i)
                n += 100
            hits[name].append(n / (time.perf_counter() - t))
            t = time.perf_counter()
            for i in range(100):
                f(10_000 + rnd * 1000 + i)
            miss[name].append((time.perf_counter() - t) / 100 * 1e6)
    for cache in caches:
        cache.close()
    out: dict[str, Any] = {}
    for name in fns:
        out[f"l1_hits_per_s_{name}"] = round(statistics.median(hits[name]))
        out[f"miss_us_{name}"] = round(statistics.median(miss[name]), 1)
    out["l1_hit_cost_of_bus"] = round(out["l1_hits_per_s_no_bus"] / out["l1_hits_per_s_bus"], 3)
    out["miss_cost_of_bus"] = round(out["miss_us_bus"] / out["miss_us_no_bus"], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__, quick="short runs (smoke test)")
    parser.add_argument("--rate", type=int, default=1000, help="invalidations per second")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each latency run")
    args = harness.parse(parser, argv)
    seconds = 1.0 if args.quick else args.seconds
    t_start = time.monotonic()
    with harness.redis_server(args.redis_server) as server:
        meta = harness.environment(server)
        harness.header(
            "tiercache coherence benchmark",
            meta,
            method=f"{'--quick' if args.quick else 'full'} run; {args.rate:,} invalidations/s for {seconds:g} s a run",
        )
        report: dict[str, Any] = {"meta": meta}
        report["latency_idle"] = run_latency(server.url, args.rate, seconds, busy=False)
        report["latency_busy"] = run_latency(server.url, args.rate, seconds, busy=True)
        report["latency_busy_1"] = run_latency(server.url, args.rate, seconds, busy=True, readers=1)
        report["latency_busy_switch"] = run_latency(server.url, args.rate, seconds, busy=True, switch=0.0005)
        report["stale"] = run_stale(server, seconds)
        report["wait"] = run_wait(server.url, 200 if args.quick else 1000)
        report["wait_busy"] = run_wait_busy(server.url, 20 if args.quick else 100)
        report["throughput"] = run_throughput(server.url, 1.0 if args.quick else 3.0)
    print("\npropagation latency, writer call -> reader subscriber applied (ms)")
    print(f"{'readers':<34} {'rate/s':>8} {'samples':>8} {'lost':>5} {'p50':>8} {'p99':>8} {'max':>8}")
    for name in ("latency_idle", "latency_busy", "latency_busy_1", "latency_busy_switch"):
        r = report[name]
        label = f"{r['readers']} {'busy' if r['busy'] else 'idle'}"
        if r["switch_interval"]:
            label += f", sys.setswitchinterval({r['switch_interval']})"
        print(
            f"{label:<34} {r['rate_achieved']:>8} {r['samples']:>8} "
            f"{r['not_applied']:>5} {r['p50_ms']:>8} {r['p99_ms']:>8} {r['max_ms']:>8}"
        )
    s = report["stale"]
    print(
        f"\nstale reads: {s['calls_started_after_return_with_old_value']} calls started after invalidate "
        f"returned still saw the old value (worst {s['worst_lateness_ms']} ms late), "
        f"over {s['invalidations']} invalidations and {s['reader_l1_hits']} reader L1 hits"
    )
    w = report["wait"]
    print(
        f"\nwait=True with {w['subscribers']} subscribers: p50 {w['invalidate_wait_p50_us']} us, "
        f"p99 {w['invalidate_wait_p99_us']} us (plain invalidate p50 {w['invalidate_p50_us']} us), "
        f"complete {w['complete']}"
    )
    w = report["wait_busy"]
    print(
        f"wait=True against {w['busy_readers']} busy reader processes (timeout {w['timeout_s']} s): "
        f"p50 {w['wait_p50_ms']} ms, p99 {w['wait_p99_ms']} ms, max {w['wait_max_ms']} ms, complete {w['complete']}"
    )
    t = report["throughput"]
    print(
        f"\ncost of coherence: L1 hits/s {t['l1_hits_per_s_bus']:,} with the bus, "
        f"{t['l1_hits_per_s_no_bus']:,} without (x{t['l1_hit_cost_of_bus']}); "
        f"miss {t['miss_us_bus']} us vs {t['miss_us_no_bus']} us (x{t['miss_cost_of_bus']})"
    )
    meta.update(quick=args.quick, **harness.footer(meta, t_start))
    if args.json:
        harness.write_json(args.json, report)
    return 0


if __name__ == "__main__":
    harness.main(main)

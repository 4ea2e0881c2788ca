#!/usr/bin/env python3
"""Does coalescing concurrent reads (``coalesce_reads``) pay? Async L2 hits, with and without.

    .venv/bin/python benchmarks/bench_coalesce.py            # full run (about half a minute)
    .venv/bin/python benchmarks/bench_coalesce.py --quick    # smoke test

N concurrent tasks each read their own key through a decorated ``async def`` with L1 turned
off (``l1_maxsize=0``), so every call is an L2 hit: one pipelined ``SET NX GET`` + ``PTTL``.
Without coalescing every call is its own round trip on a pooled connection; with it, the reads
issued in one event-loop iteration go to Redis as one pipeline on one connection. Printed:
calls per second, the median call latency, and round trips (socket writes, counted by
wrapping the pool's connections), as medians over ``--repeats`` rounds that alternate the two
settings. Starts its own throwaway redis-server (never the one on 6379).
"""

from __future__ import annotations

import asyncio
import statistics
import time

import harness
from harness import interleaved, median

from tiercache import TieredCache, tiered


async def one_round(url: str, coalesce: bool, tasks: int, calls: int) -> tuple[float, float, float]:
    cache = TieredCache(url, namespace=f"coalesce{int(coalesce)}", l1_maxsize=0, coalesce_reads=coalesce)
    await cache.aio.ready(5)

    @tiered(cache, name="read")
    async def read(x: int) -> int:
        return x

    for i in range(tasks):
        await read(i)  # fill Redis
    writes = 0
    assert cache._async is not None
    pool = cache._async._pool()[0]
    get_connection = pool.get_connection

    async def counted(*a: object, **kw: object) -> object:
        nonlocal writes
        writes += 1
        return await get_connection(*a, **kw)

    pool.get_connection = counted  # type: ignore[method-assign]
    latencies: list[float] = []
    per_task = max(1, calls // tasks)

    async def worker(x: int) -> None:
        for _ in range(per_task):
            started = time.perf_counter()
            assert await read(x) == x
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker(x) for x in range(tasks)))
    wall = time.perf_counter() - started
    await cache.aclose()
    cache.close()
    done = per_task * tasks
    return done / wall, statistics.median(latencies) * 1e6, writes / done


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(
        __doc__, quick="400 calls, 1 round, up to 100 tasks: a smoke test", repeats="rounds (default 5, --quick 1)"
    )
    args = harness.parse(parser, argv)
    repeats = args.repeats or (1 if args.quick else 5)
    calls = 400 if args.quick else 4000
    concurrency = (1, 10, 100) if args.quick else (1, 10, 50, 100, 200)
    t_start = time.monotonic()
    with harness.redis_server(args.redis_server) as server:
        meta = harness.environment(server)
        harness.header(
            "tiercache coalesce_reads benchmark",
            meta,
            method=f"{'--quick' if args.quick else 'full'} run; async L2 hits, {calls} calls, {repeats} rounds",
        )
        print(f"\n{'tasks':>6} {'coalesce':>9} {'calls/s':>9} {'p50 us':>9} {'conns/call':>11} {'speed-up':>9}")
        rows = []
        for tasks in concurrency:
            rounds: dict[bool, list[tuple[float, float, float]]] = {False: [], True: []}
            for r in range(repeats):
                for coalesce in interleaved((False, True), r):
                    rounds[coalesce].append(asyncio.run(one_round(server.url, coalesce, tasks, calls)))
            base = median([x[0] for x in rounds[False]])
            for coalesce in (False, True):
                rate = median([x[0] for x in rounds[coalesce]])
                p50 = median([x[1] for x in rounds[coalesce]])
                conns = median([x[2] for x in rounds[coalesce]])
                print(f"{tasks:>6} {coalesce!s:>9} {rate:>9.0f} {p50:>9.1f} {conns:>11.2f} {rate / base:>8.2f}x")
                rows.append(
                    {
                        "tasks": tasks,
                        "coalesce_reads": coalesce,
                        "calls_per_s": rate,
                        "p50_us": p50,
                        "connections_per_call": conns,
                        "speed_up": rate / base,
                        "rounds": rounds[coalesce],
                    }
                )
        print("conns/call: connections taken from the pool per call (each is one round trip).")
        end = harness.footer(meta, t_start)
    if args.json:
        harness.write_json(args.json, {"meta": {**meta, "quick": args.quick, **end}, "rows": rows})
    return 0


if __name__ == "__main__":
    harness.main(main)

"""Outage benchmark: how hard a Redis outage hits the function behind the cache.

Starts its own throwaway redis-server on a free loopback port, warms a @tiered function over a
few hot keys, stops the server (it goes away with its clients' connections), and keeps calling for ``--seconds``: sync
callers on threads and async callers on one event loop, each over the same hot keys. It counts
how often the function ran, per key and per second of outage, with ``outage_l1_ttl`` at its
default (``staleness_bound``, 1 s) and at 0 (L1 off while the bus is down: the behaviour before
the outage mode, as the baseline in the same run).

Usage: python benchmarks/bench_outage.py [--quick] [--seconds 3] [--keys 4] [--json PATH]
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import harness

from tiercache import TieredCache, tiered


def run(
    server: harness.RedisServer, outage_l1_ttl: float | None, seconds: float, keys: int, threads: int, tasks: int
) -> dict[str, Any]:
    """One outage: a new server (``server`` restarted), warmed, stopped, and called through."""
    if not server.running:
        server.start()
    cache = TieredCache(
        server.url, namespace="outage", socket_timeout=0.1, connect_timeout=0.1, outage_l1_ttl=outage_l1_ttl
    )
    lock = threading.Lock()
    runs = {"sync": 0, "async": 0}
    answered = {"sync": 0, "async": 0}

    def db_query(org: str, item: int) -> dict[str, Any]:  # what users write: several arguments
        with lock:
            runs["sync"] += 1
        return {"org": org, "item": item}

    async def llm_call(org: str, item: int) -> dict[str, Any]:
        with lock:
            runs["async"] += 1
        return {"org": org, "item": item}

    sync_f = tiered(cache, name="bench.db")(db_query)
    async_f = tiered(cache, name="bench.llm")(llm_call)
    try:
        assert cache.ready(10)
        for k in range(keys):
            sync_f("acme", k)
        server.stop()  # the server is gone
        deadline = time.monotonic() + 10
        while cache.stats().bus_connected and time.monotonic() < deadline:
            time.sleep(0.01)
        runs.update({"sync": 0, "async": 0})  # count the outage only
        stop = threading.Event()

        def sync_worker() -> None:
            n = 0
            while not stop.is_set():
                sync_f("acme", n % keys)
                n += 1
            with lock:
                answered["sync"] += n

        async def async_main() -> None:
            async def worker() -> None:
                n = 0
                while not stop.is_set():
                    await async_f("acme", n % keys)
                    n += 1
                    if n % 64 == 0:
                        await asyncio.sleep(0)
                with lock:
                    answered["async"] += n

            await asyncio.gather(*(worker() for _ in range(tasks)))

        workers = [threading.Thread(target=sync_worker) for _ in range(threads)]
        workers.append(threading.Thread(target=lambda: asyncio.run(async_main())))
        started = time.monotonic()
        for w in workers:
            w.start()
        time.sleep(seconds)
        stop.set()
        for w in workers:
            w.join()
        elapsed = time.monotonic() - started
    finally:
        cache.close()
        server.stop()
    return {
        "outage_l1_ttl": "default (staleness_bound = 1.0)" if outage_l1_ttl is None else outage_l1_ttl,
        "seconds": round(elapsed, 2),
        "keys": keys,
        "sync_calls": answered["sync"],
        "sync_runs": runs["sync"],
        "sync_runs_per_key_per_s": round(runs["sync"] / keys / elapsed, 2),
        "async_calls": answered["async"],
        "async_runs": runs["async"],
        "async_runs_per_key_per_s": round(runs["async"] / keys / elapsed, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__, quick="a 1 s outage (smoke test)")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of the outage")
    parser.add_argument("--keys", type=int, default=4, help="hot keys")
    args = harness.parse(parser, argv)
    seconds = 1.0 if args.quick else args.seconds
    t_start = time.monotonic()
    with harness.redis_server(args.redis_server) as server:
        meta = harness.environment(server)
        harness.header(
            "tiercache outage benchmark",
            meta,
            method=(
                f"{'--quick' if args.quick else 'full'} run; {args.keys} hot keys, Redis stopped for {seconds:g} s, "
                "2 sync threads + 4 async tasks calling"
            ),
        )
        rows = [run(server, ttl, seconds, args.keys, threads=2, tasks=4) for ttl in (None, 0.0)]
    print(f"\n{'outage_l1_ttl':<32} {'s':>5} {'calls':>10} {'fn runs':>9} {'runs/key/s':>11}  (sync | async)")
    for r in rows:
        print(
            f"{r['outage_l1_ttl']!s:<32} {r['seconds']:>5} "
            f"{r['sync_calls']:>10,} {r['sync_runs']:>9,} {r['sync_runs_per_key_per_s']:>11}  sync"
        )
        print(
            f"{'':<32} {'':>5} {r['async_calls']:>10,} {r['async_runs']:>9,} {r['async_runs_per_key_per_s']:>11}  async"
        )
    end = harness.footer(meta, t_start)
    if args.json:
        harness.write_json(args.json, {"meta": {**meta, "quick": args.quick, **end}, "rows": rows})
    return 0


if __name__ == "__main__":
    harness.main(main)

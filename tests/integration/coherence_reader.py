"""A reader process for the multi-process coherence tests (run as a script, not collected).

It calls a @tiered function that reads the "truth" counter from another Redis, as fast as it
can, and records for each value it returned the latest time (CLOCK_MONOTONIC, shared by all
processes on the machine) at which a call that returned that value *started*.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import redis

from tiercache import TieredCache, tiered


def main() -> None:
    url, truth_port, namespace, duration, bound, out = sys.argv[1:7]
    truth = redis.Redis(port=int(truth_port))
    truth_key = f"truth:{namespace}"
    cache = TieredCache(
        url, namespace=namespace, staleness_bound=float(bound), socket_timeout=0.2, connect_timeout=0.2, ttl=60
    )

    @tiered(cache, name="coherence.read")
    def read(k: int) -> int:
        return int(truth.get(truth_key) or 0)

    if not cache.ready(10):
        raise SystemExit("subscriber never became ready")
    read(0)
    print("ready", flush=True)
    last_start: dict[int, float] = {}
    calls = 0
    end = time.monotonic() + float(duration)
    while time.monotonic() < end:
        started = time.monotonic()
        value = read(0)
        last_start[value] = started
        calls += 1
        time.sleep(0.0002)
    stats = dataclasses.asdict(cache.stats())
    cache.close()
    with open(out, "w") as f:
        json.dump({"last_start": last_start, "calls": calls, "stats": stats}, f)


if __name__ == "__main__":
    main()

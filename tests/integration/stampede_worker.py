"""A worker process for the cross-process stampede tests (run as a script, not collected).

It makes one TieredCache from the JSON configuration in ``argv[1]``, waits until its
invalidation subscriber is subscribed, prints ``{"event": "ready", ...}`` and then serves
commands, one JSON object per line on stdin, answering one JSON object per line on stdout
(``{"id": <the command's id>, ...}``). The decorated functions behave as the command that
called them says (``behave``): sleep, wait for a gate the test opens, raise, read a version
counter from Redis at the start, announce that they started (``{"event": "started", ...}``).

Commands (``op``):

- ``call``: one call of the sync function ``f(arg)`` on a thread of its own; the answer has
  the value (or the error), when the call started and ended (CLOCK_MONOTONIC, shared by every
  process on the machine), how many times the function ran for ``arg`` here, and the stats.
- ``arm`` then ``go``: a burst: ``threads`` callers (threads, or tasks on the worker's event
  loop with ``"async": true``) of one ``arg``, parked until ``go``, which releases them all at
  the monotonic time ``at``; its answer collects every caller's outcome.
- ``open``: opens a gate. ``ready``: ``cache.ready(timeout)``. ``stats``. ``quit``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import json
import os
import sys
import threading
import time
from typing import Any

import redis

from tiercache import TieredCache, tiered

PID = os.getpid()
_out_lock = threading.Lock()
_state_lock = threading.Lock()
calls: collections.Counter[str] = collections.Counter()  # function runs per arg, in this process
behaviour: dict[str, dict[str, Any]] = {}  # arg -> how the function behaves for it
gates: collections.defaultdict[str, threading.Event] = collections.defaultdict(threading.Event)


def emit(msg: dict[str, Any]) -> None:
    line = json.dumps(msg)
    with _out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def main() -> None:
    config = json.loads(sys.argv[1])
    cache = TieredCache(
        config["url"],
        namespace=config["namespace"],
        lease_ttl=config.get("lease_ttl", 10.0),
        coherent=config.get("coherent", True),
        socket_timeout=config.get("socket_timeout", 0.5),
        connect_timeout=config.get("connect_timeout", 0.5),
        ttl=60,
    )
    truth = redis.Redis.from_url(config["truth_url"]) if config.get("truth_url") else None

    def begin(arg: str) -> tuple[dict[str, Any], dict[str, Any]]:
        b = behaviour.get(arg, {})
        with _state_lock:
            calls[arg] += 1
            n = calls[arg]
        version = None
        if b.get("version_key"):
            assert truth is not None
            version = int(truth.get(b["version_key"]) or 0)
        value = {"pid": PID, "arg": arg, "n": n, "version": version, "started": time.monotonic()}
        if b.get("announce"):
            emit({"event": "started", "arg": arg, "pid": PID, "version": version, "at": value["started"]})
        return b, value

    @tiered(cache, name="stampede.f")
    def f(arg: str) -> dict[str, Any]:
        b, value = begin(arg)
        if b.get("gate") and not gates[b["gate"]].wait(60):
            raise RuntimeError(f"gate {b['gate']!r} was never opened")
        if b.get("sleep"):
            time.sleep(b["sleep"])
        if b.get("raise"):
            raise RuntimeError(f"load of {arg} failed in {PID}")
        return value

    @tiered(cache, name="stampede.af")
    async def af(arg: str) -> dict[str, Any]:
        b, value = begin(arg)
        if b.get("sleep"):
            await asyncio.sleep(b["sleep"])
        if b.get("raise"):
            raise RuntimeError(f"load of {arg} failed in {PID}")
        return value

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="worker-loop", daemon=True).start()
    pool: concurrent.futures.ThreadPoolExecutor | None = None
    pool_size = 0
    burst: dict[str, Any] = {}

    def stats() -> dict[str, Any]:
        return dataclasses.asdict(cache.stats())

    def outcome(value: Any = None, error: BaseException | None = None) -> dict[str, Any]:
        if error is not None:
            return {"ok": False, "error": f"{type(error).__name__}: {error}"}
        return {"ok": True, "value": value}

    def do_call(cmd: dict[str, Any]) -> None:
        arg = cmd["arg"]
        started = time.monotonic()
        try:
            result = outcome(f(arg))
        except Exception as exc:
            result = outcome(error=exc)
        ended = time.monotonic()
        emit(
            {
                "id": cmd["id"],
                **result,
                "started": started,
                "ended": ended,
                "elapsed": ended - started,
                "calls": calls[arg],
                "stats": stats(),
            }
        )

    def sync_caller(barrier: threading.Barrier, go: threading.Event, arg: str) -> dict[str, Any]:
        barrier.wait(30)
        if not go.wait(60):
            return outcome(error=TimeoutError("no go"))
        started = time.monotonic()
        try:
            result = outcome(f(arg))
        except Exception as exc:
            result = outcome(error=exc)
        return {**result, "elapsed": time.monotonic() - started}

    async def async_caller(go: asyncio.Event, arg: str) -> dict[str, Any]:
        await go.wait()
        started = time.monotonic()
        try:
            result = outcome(await af(arg))
        except Exception as exc:
            result = outcome(error=exc)
        return {**result, "elapsed": time.monotonic() - started}

    async def arm_async(arg: str, n: int) -> tuple[asyncio.Event, list[asyncio.Task[dict[str, Any]]]]:
        go = asyncio.Event()
        tasks = [asyncio.ensure_future(async_caller(go, arg)) for _ in range(n)]
        await asyncio.sleep(0)  # every task has started and waits on go
        return go, tasks

    async def gather(tasks: list[asyncio.Task[dict[str, Any]]]) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*tasks))

    def do_arm(cmd: dict[str, Any]) -> None:
        nonlocal pool, pool_size
        arg, n = cmd["arg"], cmd["threads"]
        behaviour[arg] = cmd.get("behave", {})
        burst.clear()
        burst.update(arg=arg, is_async=bool(cmd.get("async")), before=stats())
        if burst["is_async"]:
            go, tasks = asyncio.run_coroutine_threadsafe(arm_async(arg, n), loop).result(30)
            burst.update(go=go, tasks=tasks)
        else:
            if pool is None or pool_size < n:
                pool, pool_size = concurrent.futures.ThreadPoolExecutor(max_workers=n), n
            barrier, go_event = threading.Barrier(n + 1), threading.Event()
            futures = [pool.submit(sync_caller, barrier, go_event, arg) for _ in range(n)]
            barrier.wait(30)  # every caller is parked on go_event
            burst.update(go=go_event, futures=futures)
        emit({"id": cmd["id"], "armed": True})

    def do_go(cmd: dict[str, Any]) -> None:
        delay = cmd.get("at", 0.0) - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        released = time.monotonic()
        if burst["is_async"]:
            loop.call_soon_threadsafe(burst["go"].set)
            results = asyncio.run_coroutine_threadsafe(gather(burst["tasks"]), loop).result(60)
        else:
            burst["go"].set()
            results = [fut.result(60) for fut in burst["futures"]]
        after = stats()
        before = burst["before"]
        emit(
            {
                "id": cmd["id"],
                "released": released,
                "calls": calls[burst["arg"]],
                "results": results,
                "delta": {k: after[k] - before[k] for k in after if isinstance(after[k], int) and k in before},
            }
        )

    handlers = {"call": do_call, "arm": do_arm, "go": do_go}
    if not cache.ready(10):
        raise SystemExit("the invalidation subscriber never subscribed")
    emit({"event": "ready", "pid": PID})
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "quit":
            break
        if "behave" in cmd and "arg" in cmd:
            behaviour[cmd["arg"]] = cmd["behave"]
        if op == "open":
            gates[cmd["gate"]].set()
            emit({"id": cmd["id"]})
        elif op == "ready":
            emit({"id": cmd["id"], "ready": cache.ready(cmd.get("timeout", 10))})
        elif op == "stats":
            emit({"id": cmd["id"], "stats": stats()})
        elif op in handlers:
            threading.Thread(target=handlers[op], args=(cmd,), daemon=True).start()
        else:
            emit({"id": cmd.get("id"), "error": f"unknown op {op!r}"})
    for gate in gates.values():
        gate.set()
    cache.close()
    loop.call_soon_threadsafe(loop.stop)
    os._exit(0)  # daemon threads may still be in a call: do not wait for them


if __name__ == "__main__":
    main()

"""A worker process for the cross-process tag and tenant tests (run as a script, not collected).

It makes one ``TieredCache(tenants=True)`` from the JSON configuration in ``argv[1]``, waits
until its invalidation subscriber is subscribed, prints ``{"event": "ready", "pid": ...}``,
then serves commands, one JSON object per line on stdin, answering each with one JSON object
per line on stdout (``{"id": <the command's id>, ...}``), in order.

The decorated function ``f(arg)`` is tagged ``item:<arg>`` and ``all`` and returns
``{"pid", "arg", "tenant", "n"}``: the process and the tenant it was computed in, and how many
times this process computed ``arg`` in that tenant.

Commands (``op``): ``call`` (``arg``, optional ``tenant``; answers the value and the stats),
``invalidate_tags`` (``tags``, ``wait``), ``invalidate_tenant`` (``tenant``, ``wait``),
``stats``, ``quit``.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import json
import os
import sys
from typing import Any

from tiercache import TieredCache, tiered

PID = os.getpid()
computed_in: contextvars.ContextVar[str | None] = contextvars.ContextVar("computed_in", default=None)


def emit(msg: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def main() -> None:
    config = json.loads(sys.argv[1])
    cache = TieredCache(
        config["url"],
        namespace=config["namespace"],
        tenants=True,
        staleness_bound=config.get("staleness_bound", 1.0),
        ttl=60,
    )
    calls: collections.Counter[str] = collections.Counter()

    @tiered(cache, name="tags.f", tags=lambda arg: [f"item:{arg}", "all"])
    def f(arg: str) -> dict[str, Any]:
        tenant = computed_in.get()
        calls[f"{tenant}/{arg}"] += 1
        return {"pid": PID, "arg": arg, "tenant": tenant, "n": calls[f"{tenant}/{arg}"]}

    def stats() -> dict[str, Any]:
        return dataclasses.asdict(cache.stats())

    if not cache.ready(10):
        raise SystemExit("the invalidation subscriber never subscribed")
    emit({"event": "ready", "pid": PID})
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "quit":
            break
        try:
            if op == "call":
                tenant = cmd.get("tenant")
                token = computed_in.set(tenant)
                with cache.tenant(tenant) if tenant is not None else contextlib.nullcontext():
                    value = f(cmd["arg"])
                computed_in.reset(token)
                emit({"id": cmd["id"], "value": value, "stats": stats()})
            elif op == "invalidate_tags":
                result = cache.invalidate_tags(*cmd["tags"], wait=cmd.get("wait", False))
                emit({"id": cmd["id"], "result": dataclasses.asdict(result), "complete": result.complete})
            elif op == "invalidate_tenant":
                result = cache.invalidate_tenant(cmd["tenant"], wait=cmd.get("wait", False))
                emit({"id": cmd["id"], "result": dataclasses.asdict(result), "complete": result.complete})
            elif op == "stats":
                emit({"id": cmd["id"], "stats": stats()})
            else:
                emit({"id": cmd.get("id"), "error": f"unknown op {op!r}"})
        except Exception as exc:
            emit({"id": cmd.get("id"), "error": f"{type(exc).__name__}: {exc}"})
    cache.close()


if __name__ == "__main__":
    main()

"""Command line: ``python -m tiercache demo`` runs a short, self-explaining tour of tiercache.

The demo never uses an existing Redis. It starts its own ``redis-server`` on a free loopback
port (``TIERCACHE_REDIS_SERVER`` or ``redis-server`` on PATH) and stops it by pid when done,
also on error; without one it uses ``fakeredis`` in process (``--fake`` forces that).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis

from . import TieredCache, tiered

__all__ = ["main"]

#: The conventional Redis port: the demo refuses to use it, so it cannot touch a real server.
_DEFAULT_PORT = 6379

_INSTALL_HINT = """\
The demo needs a Redis to talk to, and found none it may use:
  - {server}, and
  - fakeredis (with lupa, for Lua scripts) is not installed.
Install either one:
  apt-get install redis-server      # Debian/Ubuntu (macOS: brew install redis)
  pip install fakeredis lupa        # or: pip install -e '.[test]'
or run ./scripts/demo.sh, which installs the test extras into .venv."""

MakeCache = Callable[[str], TieredCache]


class _Backend:
    """Where the demo's Redis lives: how to make caches on it and a raw client to inspect it."""

    def __init__(self, label: str, make_cache: MakeCache, raw: redis.Redis) -> None:
        self.label = label
        self.make_cache = make_cache
        self.raw = raw


def _free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port != _DEFAULT_PORT:
            return port


def _redis_server_binary() -> str | None:
    return os.environ.get("TIERCACHE_REDIS_SERVER") or shutil.which("redis-server")


@contextmanager
def _real_redis(binary: str) -> Iterator[_Backend]:
    """A throwaway redis-server on a free loopback port, stopped by pid on the way out."""
    workdir = tempfile.mkdtemp(prefix="tiercache-demo-")
    proc: subprocess.Popen[bytes] | None = None
    try:
        port = 0
        for _attempt in range(3):  # the free port may be taken between our probe and the bind
            port = _free_port()
            args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            args += ["--dir", workdir, "--daemonize", "no", "--loglevel", "warning", "--protected-mode", "no"]
            proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # noqa: S603
            if _wait_for_ping(proc, port):
                break
            _stop(proc)
            proc = None
        if proc is None:
            raise RuntimeError(f"{binary} did not start (tried three free ports)")
        url = f"redis://127.0.0.1:{port}/0"
        raw = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
        try:
            yield _Backend(
                f"a throwaway redis-server (pid {proc.pid}) on 127.0.0.1:{port}",
                lambda namespace: TieredCache(url, namespace=namespace, ttl=300, l1_ttl=60),
                raw,
            )
        finally:
            raw.close()
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_for_ping(proc: subprocess.Popen[bytes], port: int) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        probe = redis.Redis(host="127.0.0.1", port=port, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            if probe.ping():
                return True
        except redis.ConnectionError:
            time.sleep(0.02)
        finally:
            probe.close()
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    if proc.stderr is not None:
        proc.stderr.close()


def _import_fakeredis() -> tuple[Any, Any]:
    """``fakeredis`` and ``fakeredis.aioredis``, imported only when needed (ImportError if absent)."""
    fakeredis = importlib.import_module("fakeredis")
    importlib.import_module("lupa")  # fakeredis runs tiercache's Lua scripts with it
    return fakeredis, importlib.import_module("fakeredis.aioredis")


@contextmanager
def _fake_redis(fakeredis: Any, aioredis: Any) -> Iterator[_Backend]:
    """An in-process fakeredis server; every client made here shares it (like one Redis)."""
    server = fakeredis.FakeServer()

    def make_cache(namespace: str) -> TieredCache:
        # async_client is required here: without it the async pool would be built from the
        # sync client's host and port, i.e. a real Redis on localhost:6379.
        return TieredCache(
            client=fakeredis.FakeRedis(server=server),
            async_client=aioredis.FakeRedis(server=server),
            namespace=namespace,
            ttl=300,
            l1_ttl=60,
        )

    raw: redis.Redis = fakeredis.FakeRedis(server=server)
    try:
        yield _Backend("fakeredis, in this process (no redis-server found, or --fake)", make_cache, raw)
    finally:
        raw.close()


def _fmt(seconds: float) -> str:
    if seconds >= 1e-3:
        return f"{seconds * 1e3:8.1f} ms"
    return f"{seconds * 1e6:8.1f} µs"


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t0


def _step(title: str, *lines: str) -> None:
    print(f"\n== {title}")
    for line in lines:
        print(f"   {line}")


def _tour(backend: _Backend) -> int:
    namespace = "demo-" + uuid.uuid4().hex[:8]
    print(f"tiercache demo: Redis is {backend.label}; namespace {namespace!r}")
    cache = backend.make_cache(namespace)
    other = backend.make_cache(namespace)
    computed: list[str] = []

    def slow_square(x: int) -> int:
        computed.append("A")
        time.sleep(0.2)  # stands in for a database query
        return x * x

    # name= pins the function part of the key (default: module.qualname), so that process B's
    # copy of the function below uses the same keys.
    square = tiered(cache, ttl=60, name="demo.slow_square")(slow_square)

    _step(
        "1. a @tiered sync function",
        "@tiered(cache, ttl=60) def slow_square(x): sleeps 200 ms, returns x * x",
    )
    value, first = _timed(lambda: square(12))
    print(f"   first call   slow_square(12) = {value}  {_fmt(first)}  (L1 miss, Redis miss: computed, stored in both)")
    value, second = _timed(lambda: square(12))
    print(f"   second call  slow_square(12) = {value}  {_fmt(second)}  (L1 hit: no Redis round trip, no await)")

    _step(
        "2. another process: a second TieredCache in the same namespace",
        "In a real deployment this is another worker; here it is another TieredCache with its",
        "own L1 and its own connection pool, and the same function decorated with it.",
    )

    def slow_square_b(x: int) -> int:
        computed.append("B")
        time.sleep(0.2)
        return x * x

    square_b = tiered(other, ttl=60, name="demo.slow_square")(slow_square_b)
    value, took = _timed(lambda: square_b(12))
    print(f"   other: slow_square(12) = {value}  {_fmt(took)}  computed by B: {computed.count('B')} times")
    print(f"   other.stats(): l2_hits={other.stats().l2_hits}  (read from Redis, decoded, kept in its L1)")
    value, took = _timed(lambda: square_b(12))
    print(f"   again:  slow_square(12) = {value}  {_fmt(took)}  (now an L1 hit in B too)")

    _step(
        "3. an async function",
        "@tiered(cache) async def fetch_profile(user_id): awaits 200 ms; 10 concurrent callers",
    )
    profile_loads: list[int] = []

    async def fetch_profile(user_id: int) -> dict[str, Any]:
        profile_loads.append(user_id)
        await asyncio.sleep(0.2)
        return {"id": user_id, "name": f"user{user_id}"}

    profile = tiered(cache, name="demo.fetch_profile")(fetch_profile)

    async def async_part() -> None:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(profile(7) for _ in range(10)))
        took = time.perf_counter() - t0
        print(f"   10 x await fetch_profile(7) -> {results[0]}  {_fmt(took)}  loads: {len(profile_loads)}")
        print("   (single-flight: one caller loads, the other nine wait for its result)")
        t0 = time.perf_counter()
        again = await profile(7)
        print(f"   await fetch_profile(7) again -> {again}  {_fmt(time.perf_counter() - t0)}  (L1 hit)")
        await cache.aclose()  # closes this event loop's pool (and the sync pool; it reconnects)

    asyncio.run(async_part())

    _step(
        "4. invalidate",
        "slow_square.invalidate(12) deletes the entry in Redis and in this process's L1, and",
        f"publishes one message on {'tc:' + namespace + ':inval'!r} for the other processes.",
    )
    pubsub = backend.raw.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    pubsub.subscribe(f"tc:{namespace}:inval")
    pubsub.get_message(timeout=1.0)  # the subscribe confirmation
    try:
        square.invalidate(12)
        message = pubsub.get_message(timeout=2.0)
    finally:
        pubsub.close()
    data = message["data"].decode() if message else "(none received)"
    print(f"   message published: {data}")
    print(f"   key in Redis after invalidate: {bool(backend.raw.exists(square.key(12)))}")
    before = len(computed)
    value, took = _timed(lambda: square(12))
    print(f"   this process: slow_square(12) = {value}  {_fmt(took)}  recomputed: {len(computed) > before}")
    time.sleep(0.1)  # give a subscriber, where there is one, time to act on the message
    before = computed.count("B")
    value, took = _timed(lambda: square_b(12))
    print(f"   other process: slow_square(12) = {value}  {_fmt(took)}")
    if computed.count("B") > before or other.stats().l2_hits > 1:
        print("   (its L1 copy was dropped on the message, so it read the new value)")
    else:
        print("   (served from its own L1: nothing subscribes to the invalidation channel yet, so")
        print("   another process's L1 copy lives until its l1_ttl ends, 60 s here; docs/guarantees.md)")

    _step("5. cache.stats(): this process's counters (monitoring, not accounting)")
    stats = cache.stats()
    print(f"   l1_hits={stats.l1_hits} l2_hits={stats.l2_hits} misses={stats.misses} loads={stats.loads}")
    print(f"   load_errors={stats.load_errors} backend_errors={stats.backend_errors} codec_errors={stats.codec_errors}")
    print(f"   not_cached={stats.not_cached} l1_size={stats.l1_size} l1_bytes={stats.l1_bytes}")
    print(f"   in_flight={stats.in_flight} hit_ratio={stats.hit_ratio:.2f}")

    _step("6. the keys in Redis: .key() gives the exact key a call uses")
    key = square.key(12)
    stored = backend.raw.get(key)
    header = stored[:4].hex(" ") if isinstance(stored, bytes) else "(key not found)"
    print(f"   slow_square.key(12)     = {key}")
    print(f"   slow_square.key(x=12)   = {square.key(x=12)}  (same: arguments are bound first)")
    print(f"   PTTL in Redis           = {backend.raw.pttl(key)} ms  (ttl=60)")
    print(f"   envelope header (hex)   = {header}  (magic c7, format 1, serializer 1 = msgpack, flags)")
    cache.set("user:1", {"name": "Ada"})
    print(f"   cache.key('user:1')     = {cache.key('user:1')}  (what cache.set/get use)")
    print(f"   fetch_profile.key(7)    = {profile.key(7)}")

    cache.close()
    other.close()
    errors = cache.stats().backend_errors + other.stats().backend_errors
    if errors:
        print(f"\n{errors} Redis calls failed during the demo (the cache failed open); see the log above.")
        return 1
    print("\nDone. Docs: docs/index.md; tests: ./scripts/test.sh")
    return 0


def demo(*, fake: bool = False) -> int:
    """Run the demo; 0 on success, 1 when there is no Redis to use (with install hints)."""
    binary = None if fake else _redis_server_binary()
    if binary is not None:
        with _real_redis(binary) as backend:
            return _tour(backend)
    try:
        modules = _import_fakeredis()
    except ImportError:
        server = "--fake was given" if fake else "redis-server is not on PATH (and TIERCACHE_REDIS_SERVER is not set)"
        print(_INSTALL_HINT.format(server=server), file=sys.stderr)
        return 1
    with _fake_redis(*modules) as backend:
        return _tour(backend)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m tiercache``."""
    parser = argparse.ArgumentParser(prog="python -m tiercache", description="tiercache command line")
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="a short tour against a throwaway Redis")
    demo_parser.add_argument("--fake", action="store_true", help="use fakeredis even if redis-server is on PATH")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo(fake=args.fake)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())

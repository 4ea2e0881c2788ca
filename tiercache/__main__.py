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
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis

from . import AsyncTieredFunction, TieredCache, TieredFunction, tiered

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


def _show(label: str, cache: TieredCache, call: Callable[[], Any], loads: list[str]) -> None:
    """Make one call and say, from the cache's own counters, which tier answered it."""
    before, loaded = cache.stats(), len(loads)
    value, took = _timed(call)
    after = cache.stats()
    if len(loads) > loaded:
        how = "computed: missed L1 and Redis; now stored in both"
    elif after.l1_hits > before.l1_hits:
        how = "L1 hit: no Redis round trip"
    elif after.l2_hits > before.l2_hits:
        how = "L2 hit: read from Redis without computing; now in this L1 too"
    else:
        how = "joined another caller's load"
    print(f"   {label} = {value!r}  {_fmt(took)}  {how}")


def _tour(backend: _Backend) -> int:
    namespace = "demo-" + uuid.uuid4().hex[:8]
    print(f"tiercache demo: Redis is {backend.label}; namespace {namespace!r}")
    cache = backend.make_cache(namespace)
    other = backend.make_cache(namespace)
    try:
        # Each cache runs an invalidation subscriber; L1 serves nothing until it is subscribed.
        ready = cache.ready(timeout=5) and other.ready(timeout=5)
        print(f"invalidation subscribers ready: {ready} (until then calls skip L1; see cache.ready())")
        return _steps(backend, namespace, cache, other)
    finally:
        cache.close()
        other.close()


def _steps(backend: _Backend, namespace: str, cache: TieredCache, other: TieredCache) -> int:
    loads: list[str] = []  # who computed what, in order
    square = _step_sync_function(cache, loads)
    square_b = _step_other_process(other, loads)
    profile = _step_async_function(cache, loads)
    _step_invalidate(backend, cache, other, square, square_b, loads)
    _step_stats(cache)
    _step_keys(backend, cache, square, profile)

    errors = cache.stats().backend_errors + other.stats().backend_errors
    if errors:
        print(f"\n{errors} Redis calls failed during the demo (the cache failed open); see the log above.")
        return 1
    print("\nDone. Docs: docs/index.md. Tests: ./scripts/test.sh")
    return 0


def _step_sync_function(cache: TieredCache, loads: list[str]) -> TieredFunction[..., int]:
    def slow_square(x: int) -> int:
        loads.append("A")
        time.sleep(0.2)  # stands in for a database query
        return x * x

    # name= pins the function part of the key (default: module.qualname), so that the other
    # process's copy of the function below uses the same keys.
    square = tiered(cache, ttl=60, name="demo.slow_square")(slow_square)

    _step("1. a @tiered sync function", "@tiered(cache, ttl=60) def slow_square(x): sleeps 200 ms, returns x * x")
    _show("first call   slow_square(12)", cache, lambda: square(12), loads)
    _show("second call  slow_square(12)", cache, lambda: square(12), loads)
    return square


def _step_other_process(other: TieredCache, loads: list[str]) -> TieredFunction[..., int]:
    _step(
        "2. another process: a second TieredCache in the same namespace",
        "In production this is another worker; here it is a second TieredCache with its own L1",
        "and connection pool, and its own copy of the function (which would compute as 'B').",
    )

    def slow_square_b(x: int) -> int:
        loads.append("B")
        time.sleep(0.2)
        return x * x

    square_b = tiered(other, ttl=60, name="demo.slow_square")(slow_square_b)
    _show("other: slow_square(12)", other, lambda: square_b(12), loads)
    _show("other: slow_square(12)", other, lambda: square_b(12), loads)
    return square_b


def _step_async_function(cache: TieredCache, loads: list[str]) -> AsyncTieredFunction[[int], dict[str, Any]]:
    _step(
        "3. an async function",
        "@tiered(cache) async def fetch_profile(user_id): awaits 200 ms. Ten concurrent callers:",
    )

    async def fetch_profile(user_id: int) -> dict[str, Any]:
        loads.append("profile")
        await asyncio.sleep(0.2)
        return {"id": user_id, "name": f"user{user_id}"}

    profile = tiered(cache, name="demo.fetch_profile")(fetch_profile)

    async def async_part() -> None:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(profile(7) for _ in range(10)))
        took = time.perf_counter() - t0
        print(f"   10 x await fetch_profile(7) = {results[0]!r}  {_fmt(took)}")
        print(f"   computed {loads.count('profile')} time(s): one caller loads, the others wait for it (single-flight)")
        before = cache.stats().l1_hits
        value, took = await _atimed(profile(7))
        how = "L1 hit: answered without an await" if cache.stats().l1_hits > before else "not an L1 hit"
        print(f"   await fetch_profile(7) = {value!r}  {_fmt(took)}  {how}")
        # No aclose() here: it would close the whole cache. The pool this event loop used is
        # closed by cache.close() at the end, once the loop has finished.

    asyncio.run(async_part())
    return profile


def _step_invalidate(
    backend: _Backend,
    cache: TieredCache,
    other: TieredCache,
    square: TieredFunction[..., int],
    square_b: TieredFunction[..., int],
    loads: list[str],
) -> None:
    channel = cache._core.channel
    _step(
        "4. invalidate",
        "slow_square.invalidate(12) deletes the entry from Redis and from this process's L1, and",
        f"publishes one message on {channel!r}: every subscribed process evicts its L1 copy.",
    )
    pubsub = backend.raw.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    heard = other.stats().bus_messages
    try:
        pubsub.subscribe(channel)
        pubsub.get_message(timeout=1.0)  # the subscribe confirmation
        result = square.invalidate(12)
        message = pubsub.get_message(timeout=2.0)
    finally:
        pubsub.close()
    print(f"   returned: {result}  (receivers: the subscribers Redis delivered it to)")
    print(f"   message:  {message['data'].decode() if message else '(none received)'}")
    print(f"   key in Redis afterwards: {bool(backend.raw.exists(square.key(12)))}")
    deadline = time.monotonic() + 2
    while other.stats().bus_messages == heard and time.monotonic() < deadline:
        time.sleep(0.005)  # the other subscriber applies the message on its own thread
    _show("this process:  slow_square(12)", cache, lambda: square(12), loads)
    before = other.stats().l1_hits
    _show("other process: slow_square(12)", other, lambda: square_b(12), loads)
    if other.stats().l1_hits > before:
        print("   The other process still answered from its L1: its subscriber had not applied the")
        print("   message (is it connected? other.stats().bus_connected). docs/guarantees.md")
    else:
        print("   The other process had dropped its L1 copy on the message, so it read Redis again.")
    written = cache.set("user:1", {"name": "Ada"}, wait=True)
    print(f"   cache.set('user:1', ..., wait=True) -> {written}")
    print("   (wait=True returns once every subscriber acknowledged applying the write, or after a timeout)")


def _step_stats(cache: TieredCache) -> None:
    _step("5. cache.stats(): this process's counters (for monitoring, not accounting)")
    stats = cache.stats()
    print(f"   l1_hits={stats.l1_hits} l2_hits={stats.l2_hits} misses={stats.misses} loads={stats.loads}")
    print(f"   load_errors={stats.load_errors} backend_errors={stats.backend_errors} codec_errors={stats.codec_errors}")
    print(f"   not_cached={stats.not_cached} l1_size={stats.l1_size} l1_bytes={stats.l1_bytes}")
    print(f"   in_flight={stats.in_flight} hit_ratio={stats.hit_ratio:.2f}")
    print(f"   bus_connected={stats.bus_connected} bus_messages={stats.bus_messages}", end=" ")
    print(f"bus_flushes={stats.bus_flushes} bus_gaps={stats.bus_gaps}")


def _step_keys(
    backend: _Backend,
    cache: TieredCache,
    square: TieredFunction[..., int],
    profile: AsyncTieredFunction[[int], dict[str, Any]],
) -> None:
    _step("6. the keys in Redis: .key() gives the exact key a call uses")
    key = square.key(12)
    stored = backend.raw.get(key)
    header = stored[:4].hex(" ") if isinstance(stored, bytes) else "(key not found)"
    print(f"   slow_square.key(12)    = {key}")
    print(f"   slow_square.key(x=12)  = {square.key(x=12)}  (the same call)")
    print(f"   fetch_profile.key(7)   = {profile.key(7)}")
    print(f"   cache.key('user:1')    = {cache.key('user:1')}  (cache.get/set/delete keys)")
    print(f"   PTTL of the first key  = {backend.raw.pttl(key)} ms  (ttl=60 s)")
    print(f"   its value's header     = {header}  (magic c7, envelope v1, serializer 1 = msgpack, flags)")


async def _atimed(awaitable: Awaitable[Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    value = await awaitable
    return value, time.perf_counter() - t0


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

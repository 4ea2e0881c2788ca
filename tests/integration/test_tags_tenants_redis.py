"""Tags and tenants on a real redis-server: invalidations reaching other processes (other
caches, on fakeredis and real Redis: test_tags_tenants_backends.py), the O(1) cost of
invalidating a tag (counted with ``INFO commandstats``), tag and tenant versions cached in L1,
a state machine over a pair of caches, and Redis unable to say the versions.

(Named ``..._redis.py``: ``tests/unit/test_tags_tenants.py`` already takes the basename, and
the test directories are not packages.)"""

from __future__ import annotations

import collections
import itertools
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test

from tests.support import Loader, RedisServer, SyncOnly, eventually, ready
from tests.unit.test_tags_tenants import MACHINE_SETTINGS, TenantMachine, computed, within
from tiercache import BackendError, TieredCache, tiered

pytestmark = pytest.mark.redis

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("tags_worker.py")
IGNORED = {"info", "ping"}  # this test's own INFO, and subscribers' idle health checks
NO_SCAN = {"keys", "scan", "sscan", "hscan", "zscan"}


def command_calls(raw: redis.Redis) -> collections.Counter[str]:
    """Calls per command so far on the server (``INFO commandstats``), Lua's own included."""
    stats = raw.info("commandstats")
    return collections.Counter({name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()})


class Commands:
    """The commands the server ran between ``start()`` and ``delta()`` (INFO and PING aside)."""

    def __init__(self, raw: redis.Redis) -> None:
        self.raw = raw
        self.before = command_calls(raw)

    def start(self) -> Commands:
        self.before = command_calls(self.raw)
        return self

    def delta(self) -> collections.Counter[str]:
        d = command_calls(self.raw) - self.before
        for name in IGNORED:
            d.pop(name, None)
        return d


@pytest.fixture
def new_cache(redis_server: RedisServer, namespace: str) -> Iterator[Callable[..., TieredCache]]:
    """``new_cache(url=None, **kwargs)``: a subscribed TieredCache in this test's namespace, closed at teardown."""
    made: list[TieredCache] = []

    def make(url: str | None = None, **kwargs: Any) -> TieredCache:
        kwargs.setdefault("namespace", namespace)
        cache = TieredCache(url or redis_server.url, **kwargs)
        made.append(cache)
        return ready(cache) if kwargs.get("coherent", True) else cache

    yield make
    for cache in made:
        cache.close()


def test_invalidating_a_tag_costs_the_same_few_commands_for_10_or_1000_entries(
    own_redis: RedisServer, own_raw: redis.Redis, namespace: str
) -> None:
    serial = itertools.count()
    caches = [ready(TieredCache(own_redis.url, namespace=namespace)) for _ in range(2)]
    try:
        f, g = (tiered(c, name="o1.f", tags=lambda i, group: [group])(lambda i, group: next(serial)) for c in caches)
        untagged = tiered(caches[0], name="o1.u")(lambda i: next(serial))
        small = {i: f(i, "small") for i in range(10)}
        big = {i: f(i, "big") for i in range(1000)}
        kept = untagged(0)
        assert (g(0, "small"), g(0, "big")) == (small[0], big[0])  # the other cache's L1 has them

        caches[0].invalidate_tags("warm-up")  # the server learns the script (NOSCRIPT, then EVAL)
        deltas = {}
        commands = Commands(own_raw)
        for group in ("small", "big"):
            commands.start()
            result = caches[0].invalidate_tags(group)
            deltas[group] = commands.delta()
            assert result.seq is not None and result.receivers == 2, result
        assert deltas["small"] == deltas["big"], deltas
        assert deltas["big"]["evalsha"] == 1, deltas  # one script
        assert sum(deltas["big"].values()) <= 6, deltas  # the script and what it runs: INCRs, DEL, PUBLISH
        everything = command_calls(own_raw)
        assert not [n for n in everything if n.split("|")[0] in NO_SCAN], everything

        # exactly the tagged entries are gone, here and (once the message arrived) in the other cache
        assert all(f(i, "small") != small[i] for i in range(10))
        assert all(f(i, "big") != big[i] for i in (0, 1, 500, 999))
        assert untagged(0) == kept
        eventually(lambda: g(0, "big") != big[0], "the other cache dropping its tagged entry", timeout=2)
    finally:
        for c in caches:
            c.close()


def test_versions_are_cached_in_l1_and_an_invalidation_evicts_them(
    own_redis: RedisServer, own_raw: redis.Redis, namespace: str
) -> None:
    cache = ready(TieredCache(own_redis.url, namespace=namespace, tenants=True))
    other = ready(TieredCache(own_redis.url, namespace=namespace, tenants=True))
    try:
        loader = Loader(SyncOnly, computed)
        f = tiered(cache, name="v.f", tags=["t"])(loader.fn())
        commands = Commands(own_raw)
        with within(cache, "a"):
            first = f(1)  # reads the tag's and the tenant's versions: one MGET
            assert commands.delta()["mget"] == 1
            commands.start()
            f(2)  # versions from L1: no MGET, only the miss of f(2) itself
            d = commands.delta()
            assert d["mget"] == 0 and d["pttl"] == 1, d
            commands.start()
            hits = cache.stats().l1_hits
            assert f(1) == first
            f(2)
            assert commands.delta() == collections.Counter()  # no round trip at all
            assert cache.stats().l1_hits == hits + 2

        # a bump of either counter, from another cache, evicts the cached versions here
        for bump in (lambda: other.invalidate_tags("t", wait=True), lambda: other.invalidate_tenant("a", wait=True)):
            result = bump()
            assert result.complete and result.receivers == 2, result
            with within(cache, "a"):
                commands.start()
                again = f(1)
                assert commands.delta()["mget"] == 1
                assert again != first
                first = again
                commands.start()
                assert f(1) == again
                assert commands.delta() == collections.Counter()
    finally:
        cache.close()
        other.close()


def test_state_machine_on_a_pair_of_caches(redis_server: RedisServer) -> None:
    class RedisPair(TenantMachine):
        def make_caches(self) -> list[TieredCache]:
            namespace = "sm" + uuid.uuid4().hex[:10]
            return [ready(TieredCache(redis_server.url, namespace=namespace, tenants=True)) for _ in range(2)]

    run_state_machine_as_test(RedisPair, settings=settings(MACHINE_SETTINGS, max_examples=20))


# -- Redis cannot say the versions --------------------------------------------------------------


def test_versions_unreadable_answers_from_the_function_and_stores_nothing(
    own_redis: RedisServer, own_raw: redis.Redis, namespace: str
) -> None:
    """The version counters cannot be read (an ACL user without access to ``tc:*:tag:*`` and
    ``tc:*:tenant:*``) while the rest of Redis works: a scoped call is answered by the function
    each time and stored nowhere (its key is unknown); unscoped calls still cache."""
    own_raw.execute_command(
        "ACL", "SETUSER", "app", "on", ">secret", "~tc:*:v1:*", "~tc:*:seq", "~tc:*:gen", "~tc:*:ack:*", "&*", "+@all"
    )
    url = f"redis://app:secret@127.0.0.1:{own_redis.port}/0"
    cache = TieredCache(url, namespace=namespace, tenants=True, breaker_threshold=10_000)
    strict = TieredCache(url, namespace=namespace, tenants=True, strict=True)
    try:
        ready(cache)
        ready(strict)
        loader = Loader(SyncOnly, computed)
        tagged = tiered(cache, name="down.tagged", tags=["t"])(loader.fn())
        scoped = tiered(cache, name="down.scoped")(loader.fn())
        plain = tiered(cache, name="down.plain")(loader.fn())
        assert tagged(1) != tagged(1)  # tags, no tenant
        with within(cache, "a"):
            a1, a2 = scoped(1), scoped(1)
            assert a1 != a2 and a1[0] == a2[0] == "a"
            assert cache.set("k", "v").seq is None
            assert cache.get("k", "default") == "default"
        p = plain(1)  # the shared scope without tags needs no versions
        assert plain(1) == p
        assert cache.stats().backend_errors >= 5
        assert cache.stats().l1_size == 1  # plain(1) only
        keys = own_raw.keys(f"tc:{namespace}:v1:*".encode())
        assert [k.decode() for k in keys] == [plain.key(1)], keys

        g = tiered(strict, name="down.tagged", tags=["t"])(loader.fn())
        with pytest.raises(BackendError, match="MGET"):
            g(1)
    finally:
        cache.close()
        strict.close()


def test_redis_down_while_versions_are_needed(own_redis: RedisServer, namespace: str) -> None:
    cache = TieredCache(own_redis.url, namespace=namespace, tenants=True, coherent=False, socket_timeout=0.2)
    try:
        loader = Loader(SyncOnly, computed)
        f = tiered(cache, name="down.f", tags=["t"])(loader.fn())
        own_redis.kill()
        with within(cache, "a"):
            first, second = f(1), f(1)
        assert first != second and first[0] == second[0] == "a"
        assert cache.stats().l1_size == 0
        own_redis.start()
        with within(cache, "a"):  # the breaker lets a call through again after its cooldown (1 s)
            eventually(lambda: f(1) == f(1), "caching again after Redis came back", interval=0.05)
    finally:
        cache.close()


# -- other processes --------------------------------------------------------------------------------


class TagsWorker:
    """One ``tags_worker.py`` process, answering one JSON line per command, in order."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), json.dumps(config)],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pid = self.proc.pid
        self._ids = itertools.count(1)
        self._lines: collections.deque[dict[str, Any]] = collections.deque()
        self._cond = threading.Condition()
        self._eof = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self._lines.append(json.loads(line))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def next_message(self, timeout: float = 15) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._lines:
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    pytest.fail(f"worker {self.pid}: no answer within {timeout} s (exit code {self.proc.poll()})")
                self._cond.wait(left)
            return self._lines.popleft()

    def request(self, op: str, **kwargs: Any) -> dict[str, Any]:
        request_id = next(self._ids)
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, "id": request_id, **kwargs}) + "\n")
        self.proc.stdin.flush()
        msg = self.next_message()
        assert msg.get("id") == request_id and "error" not in msg, msg
        return msg

    def call(self, arg: str, tenant: str | None = None) -> dict[str, Any]:
        return self.request("call", arg=arg, tenant=tenant)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass


@pytest.mark.slow
def test_tag_and_tenant_invalidations_reach_other_processes(redis_server: RedisServer, namespace: str) -> None:
    bound = 1.0
    config = {"url": redis_server.url, "namespace": namespace, "staleness_bound": bound}
    workers = [TagsWorker(config) for _ in range(2)]
    mine = TieredCache(redis_server.url, namespace=namespace, tenants=True)
    try:
        for w in workers:
            assert w.next_message()["event"] == "ready"
        ready(mine)
        w1, w2 = workers

        x1 = w1.call("x")["value"]
        assert x1["pid"] == w1.pid
        assert w2.call("x")["value"] == x1  # from Redis
        y2 = w2.call("y")["value"]
        assert w2.call("x")["value"] == x1  # from w2's L1

        # a tag invalidation without wait, from this process: w2's next calls recompute within the bound
        started = time.monotonic()
        mine.invalidate_tags("item:x")
        while True:
            answer = w2.call("x")
            if answer["value"] != x1:
                break
            assert time.monotonic() - started < bound, "the tag invalidation did not reach w2 within the bound"
        assert answer["value"] == {"pid": w2.pid, "arg": "x", "tenant": None, "n": 1}  # w2 computed it
        hits = answer["stats"]["l1_hits"]
        answer = w2.call("y")
        assert answer["value"] == y2 and answer["stats"]["l1_hits"] == hits + 1  # untouched, from L1

        # with wait=True from a worker: every process acknowledged before it returns
        done = w1.request("invalidate_tags", tags=["all"], wait=True)
        assert done["complete"] and done["result"]["receivers"] == 3, done
        assert w2.call("y")["value"] == {"pid": w2.pid, "arg": "y", "tenant": None, "n": 2}
        x_all = w2.call("x")["value"]
        assert x_all["n"] == 2

        # tenants
        a1, b1 = w1.call("x", "a")["value"], w1.call("x", "b")["value"]
        assert (a1["tenant"], b1["tenant"]) == ("a", "b")
        assert w2.call("x", "a")["value"] == a1 and w2.call("x", "b")["value"] == b1
        result = mine.invalidate_tenant("a", wait=True)
        assert result.complete and result.receivers == 3, result
        a2 = w2.call("x", "a")["value"]
        assert a2 == {"pid": w2.pid, "arg": "x", "tenant": "a", "n": 1}
        answer = w2.call("x", "b")
        assert answer["value"] == b1
        assert w2.call("x")["value"] == x_all  # the shared scope is not a tenant
        assert w1.call("x", "a")["value"] == a2  # w1 reads w2's new value from Redis
    finally:
        for w in workers:
            w.close()
        mine.close()

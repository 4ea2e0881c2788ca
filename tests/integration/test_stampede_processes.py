"""Cross-process single-flight with leases, on real OS processes and a real redis-server.

Worker processes (``stampede_worker.py``) each run one TieredCache and call the same
decorated functions on command; the test releases their callers together and counts how many
times the function ran in total. Then the failure cases of the lease: its holder SIGKILLed,
its function raising, Redis killed during the load, no bus (polling), and an invalidation
while other processes wait for the holder.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support import RedisServer, eventually
from tiercache import TieredCache, tiered

pytestmark = [pytest.mark.redis, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("stampede_worker.py")
PROCESSES = 4
THREADS = 100
TRIALS = 100
ASYNC_TRIALS = 20
LOAD = 0.05  # seconds the function takes in the stampede trials


class Worker:
    """One ``stampede_worker.py`` process and the JSON lines it printed."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), json.dumps(config)],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pid = self.proc.pid
        self.messages: list[dict[str, Any]] = []
        self.eof = False
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            msg = json.loads(line)
            with self._cond:
                self.messages.append(msg)
                self._cond.notify_all()
        with self._cond:
            self.eof = True
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for msg in self.messages:
                    if predicate(msg):
                        return msg
                left = deadline - time.monotonic()
                if self.eof or left <= 0:
                    pytest.fail(
                        f"worker {self.pid}: no {what} within {timeout} s (exited: {self.proc.poll()}, "
                        f"messages: {self.messages[-5:]})"
                    )
                self._cond.wait(left)

    def send(self, op: str, **kwargs: Any) -> int:
        request_id = next(self._ids)
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, "id": request_id, **kwargs}) + "\n")
        self.proc.stdin.flush()
        return request_id

    def reply(self, request_id: int, timeout: float = 30) -> dict[str, Any]:
        return self.wait_for(lambda m: m.get("id") == request_id, timeout, f"reply to request {request_id}")

    def request(self, op: str, within: float = 30, **kwargs: Any) -> dict[str, Any]:
        return self.reply(self.send(op, **kwargs), within)

    def started(self, arg: str, timeout: float = 10) -> dict[str, Any]:
        """The announcement that this worker's function started loading ``arg``."""
        return self.wait_for(
            lambda m: m.get("event") == "started" and m.get("arg") == arg, timeout, f"start of the load of {arg}"
        )

    def has_started(self, arg: str) -> bool:
        with self._cond:
            return any(m.get("event") == "started" and m.get("arg") == arg for m in self.messages)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            self.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        self._reader.join(5)


@pytest.fixture
def workers(redis_server: RedisServer, namespace: str) -> Iterator[Callable[..., list[Worker]]]:
    """``workers(n, **config)``: n worker processes on the session server (or ``url=``) in this
    test's namespace, each subscribed; every one is stopped at teardown, SIGKILLed if need be."""
    made: list[Worker] = []

    def start(n: int, **config: Any) -> list[Worker]:
        config.setdefault("url", redis_server.url)
        config.setdefault("namespace", namespace)
        config.setdefault("truth_url", redis_server.url)
        batch = [Worker(config) for _ in range(n)]
        made.extend(batch)
        for w in batch:
            w.wait_for(lambda m: m.get("event") == "ready", 20, "ready")
        return batch

    yield start
    for w in made:
        w.close()


@pytest.fixture
def local_cache(redis_server: RedisServer, namespace: str) -> Iterator[Callable[..., TieredCache]]:
    """``local_cache(**kwargs)``: a TieredCache in the test process, in this test's namespace."""
    made: list[TieredCache] = []

    def make(**kwargs: Any) -> TieredCache:
        url = kwargs.pop("url", redis_server.url)
        cache = TieredCache(url, namespace=namespace, **kwargs)
        made.append(cache)
        assert cache.ready(10), "the cache's invalidation subscriber did not subscribe within 10 s"
        return cache

    yield make
    for cache in made:
        cache.close()


def redis_key(cache: TieredCache, arg: str) -> str:
    """The Redis key of the workers' ``f(arg)``."""

    @tiered(cache, name="stampede.f")
    def f(arg: str) -> Any:
        raise AssertionError("only for its key")

    return f.key(arg)


def wait_for_waiter(raw: redis.Redis, key: str, timeout: float = 5) -> None:
    """Until a process waiting for another's load of ``key`` has raised the key's waiter flag."""
    eventually(lambda: raw.exists(key + ":w"), f"the waiter flag of {key}", timeout=timeout, interval=0.005)


def run_stampede(
    procs: list[Worker], trials: int, threads: int, load: float, *, is_async: bool = False, prefix: str = "t"
) -> tuple[list[int], list[dict[str, Any]]]:
    """``trials`` bursts, each on a fresh key: every worker parks ``threads`` callers, then all
    are released at one instant. Returns the total function calls of each trial, and per
    trial the workers' answers."""
    totals: list[int] = []
    answers: list[dict[str, Any]] = []
    for trial in range(trials):
        arg = f"{prefix}{trial}"
        ids = [w.send("arm", arg=arg, threads=threads, behave={"sleep": load}, **{"async": is_async}) for w in procs]
        for w, i in zip(procs, ids, strict=True):
            w.reply(i, 30)
        at = time.monotonic() + 0.01
        ids = [w.send("go", at=at) for w in procs]
        replies = [w.reply(i, 60) for w, i in zip(procs, ids, strict=True)]
        results = [r for reply in replies for r in reply["results"]]
        errors = [r["error"] for r in results if not r["ok"]]
        assert not errors, f"trial {trial}: callers raised: {collections.Counter(errors)}"
        values = {json.dumps(r["value"], sort_keys=True) for r in results}
        slowest = max(r["elapsed"] for r in results)
        # The losers are woken by the winner's fill; a missed wake-up costs the 10 s lease.
        assert slowest < 2.0, f"trial {trial}: a caller took {slowest:.3f} s for a {load * 1000:.0f} ms load"
        totals.append(sum(reply["calls"] for reply in replies))
        answers.append(
            {
                "trial": trial,
                "calls": [reply["calls"] for reply in replies],
                "distinct_values": len(values),
                "lease_waits": [reply["delta"]["lease_waits"] for reply in replies],
                "lease_timeouts": [reply["delta"]["lease_timeouts"] for reply in replies],
                "slowest": slowest,
            }
        )
    return totals, answers


def report(title: str, totals: list[int], answers: list[dict[str, Any]], seconds: float) -> str:
    distribution = dict(sorted(collections.Counter(totals).items()))
    waits = collections.Counter(sum(a["lease_waits"]) for a in answers)
    slowest = max(a["slowest"] for a in answers)
    text = (
        f"{title}: {len(totals)} trials in {seconds:.1f} s; function calls per trial -> trials: {distribution}; "
        f"lease waits per trial -> trials: {dict(sorted(waits.items()))}; slowest caller {slowest * 1000:.0f} ms"
    )
    print(text)
    return text


# -- 1. the stampede --------------------------------------------------------------------------


def test_cold_key_stampede_calls_the_function_once_across_processes(
    workers: Callable[..., list[Worker]],
) -> None:
    """4 processes x 100 threads released together on a cold key: one function call in total."""
    procs = workers(PROCESSES)
    began = time.monotonic()
    totals, answers = run_stampede(procs, TRIALS, THREADS, LOAD)
    summary = report("sync stampede", totals, answers, time.monotonic() - began)
    # In a trial with one load, every one of the 400 callers got that load's value.
    assert all(a["distinct_values"] == 1 for a, t in zip(answers, totals, strict=True) if t == 1), summary
    assert sum(t == 1 for t in totals) >= TRIALS - 1, (
        f"{summary}; trials with another count: {[a for a, t in zip(answers, totals, strict=True) if t != 1][:5]}"
    )
    assert all(t >= 1 for t in totals)
    # The losers really waited for the announcement: no wait ran out.
    assert all(sum(a["lease_timeouts"]) == 0 for a in answers), summary


def test_cold_key_stampede_async_calls_the_function_once_across_processes(
    workers: Callable[..., list[Worker]],
) -> None:
    """The same with 100 asyncio tasks per process."""
    procs = workers(PROCESSES)
    began = time.monotonic()
    totals, answers = run_stampede(procs, ASYNC_TRIALS, THREADS, LOAD, is_async=True, prefix="a")
    summary = report("async stampede", totals, answers, time.monotonic() - began)
    assert all(a["distinct_values"] == 1 for a, t in zip(answers, totals, strict=True) if t == 1), summary
    assert sum(t == 1 for t in totals) >= ASYNC_TRIALS - 1, summary
    assert all(sum(a["lease_timeouts"]) == 0 for a in answers), summary


# -- 2. the lease holder dies ------------------------------------------------------------------


def test_a_sigkilled_lease_holder_costs_one_lease_ttl_then_a_waiter_loads(
    workers: Callable[..., list[Worker]], local_cache: Callable[..., TieredCache], raw: redis.Redis
) -> None:
    lease_ttl = 1.0
    (holder,) = workers(1, lease_ttl=lease_ttl)
    cache = local_cache(lease_ttl=lease_ttl)
    calls: list[float] = []

    @tiered(cache, name="stampede.f")
    def f(arg: str) -> dict[str, Any]:
        calls.append(time.monotonic())
        return {"pid": os.getpid(), "arg": arg}

    key = f.key("k")
    holder.send("call", arg="k", behave={"announce": True, "sleep": 60})
    leased_at = holder.started("k")["at"]  # the lease was taken just before the function started
    marker = raw.get(key)
    assert marker is not None and marker[:2] == b"\xc7\x00", f"the holder's lease marker is in the key: {marker!r}"
    holder.kill()

    began = time.monotonic()
    value = f("k")
    elapsed = time.monotonic() - began
    assert value == {"pid": os.getpid(), "arg": "k"}
    assert len(calls) == 1, f"the waiter's function ran {len(calls)} times"
    since_lease = calls[0] - leased_at
    assert since_lease >= lease_ttl * 0.8, (
        f"the waiter loaded {since_lease:.3f} s after the dead holder took its lease (lease_ttl {lease_ttl} s)"
    )
    print(f"dead holder: the waiter answered in {elapsed:.3f} s, loaded {since_lease:.3f} s after the lease was taken")
    assert elapsed < lease_ttl + 2, f"the waiter took {elapsed:.3f} s"
    stats = cache.stats()
    assert stats.lease_waits >= 1, stats
    assert stats.lease_timeouts == 0, stats
    # The waiter took the lease over, so its result was stored: a fresh process finds it in Redis.
    stored = raw.get(key)
    assert stored is not None and stored[:2] != b"\xc7\x00", f"not stored in Redis: {stored!r}"
    (reader,) = workers(1, lease_ttl=lease_ttl)
    answer = reader.request("call", arg="k")
    assert answer["ok"] and answer["value"] == value and answer["calls"] == 0, answer


def test_a_sigkilled_holder_with_several_waiting_processes_costs_one_load_in_total(
    workers: Callable[..., list[Worker]], raw: redis.Redis, redis_server: RedisServer, namespace: str
) -> None:
    """Three processes wait on a holder that is SIGKILLed: after its lease runs out one of them
    takes the lease and loads, and the other two wait for that load (their wait restarts with
    the new lease) instead of giving up and loading too."""
    lease_ttl = 1.0
    holder, *waiting = workers(4, lease_ttl=lease_ttl)
    holder.send("call", arg="dead", behave={"announce": True, "sleep": 60})
    holder.started("dead")
    ids = [(w, w.send("call", arg="dead", behave={"sleep": 0.2})) for w in waiting]
    key = redis_key_for(redis_server, namespace, "dead")
    wait_for_waiter(raw, key)
    holder.kill()
    answers = [w.reply(i, timeout=10) for w, i in ids]
    assert all(a["ok"] for a in answers), answers
    calls = sum(a["calls"] for a in answers)
    assert calls == 1, f"{calls} loads after the holder died (one per waiting process means each gave up): {answers}"
    assert len({json.dumps(a["value"], sort_keys=True) for a in answers}) == 1, answers


# -- 3. losers are woken by the fill's announcement ---------------------------------------------


def test_waiters_are_woken_by_the_fill_announcement_not_the_lease_expiry(
    workers: Callable[..., list[Worker]], local_cache: Callable[..., TieredCache], raw: redis.Redis
) -> None:
    winner, loser = workers(2, lease_ttl=10.0)
    key = redis_key(local_cache(), "k")
    winner_call = winner.send("call", arg="k", behave={"announce": True, "gate": "g"})
    started = winner.started("k")["at"]
    loser_call = loser.send("call", arg="k")
    wait_for_waiter(raw, key)
    time.sleep(max(0.0, started + 0.2 - time.monotonic()))  # a 200 ms load
    winner.request("open", gate="g")
    won = winner.reply(winner_call, 10)
    lost = loser.reply(loser_call, 15)
    assert won["ok"] and lost["ok"], (won, lost)
    assert lost["value"] == won["value"], "the loser answered with the winner's value"
    assert lost["calls"] == 0, "the loser's function was not called"
    print(
        f"announcement: loser answered in {lost['elapsed']:.3f} s, {lost['ended'] - won['ended']:.4f} s after "
        f"the winner; lease_waits {lost['stats']['lease_waits']}"
    )
    assert lost["elapsed"] < 1.5, f"the loser took {lost['elapsed']:.3f} s with lease_ttl=10 s: not woken by the fill"
    assert lost["ended"] - won["ended"] < 1.0, "the loser returned soon after the winner's fill"
    assert 1 <= lost["stats"]["lease_waits"] <= 3, lost["stats"]
    assert lost["stats"]["lease_timeouts"] == 0, lost["stats"]
    assert lost["stats"]["l2_hits"] == 1, lost["stats"]
    assert not raw.exists(key + ":w"), "the fill took the waiter flag down"


# -- 4. a failing winner -----------------------------------------------------------------------


def test_a_failing_winner_releases_the_lease_and_a_waiter_takes_over_promptly(
    workers: Callable[..., list[Worker]], local_cache: Callable[..., TieredCache], raw: redis.Redis
) -> None:
    winner, loser = workers(2, lease_ttl=10.0)
    key = redis_key(local_cache(), "k")
    winner_call = winner.send("call", arg="k", behave={"announce": True, "gate": "g", "raise": True})
    winner.started("k")
    loser_call = loser.send("call", arg="k", behave={"announce": True})
    wait_for_waiter(raw, key)
    assert not loser.has_started("k"), "the loser waits rather than loading"
    opened = time.monotonic()
    winner.request("open", gate="g")
    failed = winner.reply(winner_call, 10)
    assert not failed["ok"] and "RuntimeError" in failed["error"], failed
    took_over = loser.reply(loser_call, 15)
    assert took_over["ok"], took_over
    print(f"failing winner: the loser finished {took_over['ended'] - opened:.3f} s after the gate opened")
    assert took_over["calls"] == 1, "the loser loaded the key itself"
    assert took_over["value"]["pid"] == loser.pid
    assert took_over["ended"] - opened < 2.0, (
        f"the loser finished {took_over['ended'] - opened:.3f} s after the winner failed (lease_ttl 10 s)"
    )
    assert took_over["stats"]["lease_timeouts"] == 0, took_over["stats"]
    # It held the lease, so its value was stored: the former winner now reads it from Redis.
    again = winner.request("call", arg="k")
    assert again["ok"] and again["value"] == took_over["value"] and again["calls"] == 1, again


# -- 5. Redis dies during a load ----------------------------------------------------------------


def test_redis_killed_during_a_load_fails_open_and_recovers(
    workers: Callable[..., list[Worker]], own_redis: RedisServer, own_raw: redis.Redis, namespace: str
) -> None:
    leader, waiter = workers(2, url=own_redis.url, truth_url=None, lease_ttl=10.0, socket_timeout=0.3)
    key = redis_key_for(own_redis, namespace, "k")
    leader_call = leader.send("call", arg="k", behave={"announce": True, "gate": "g"})
    leader.started("k")
    waiter_call = waiter.send("call", arg="k")
    wait_for_waiter(own_raw, key)
    killed = time.monotonic()
    own_redis.kill()
    leader.request("open", gate="g")
    led = leader.reply(leader_call, 15)
    waited = waiter.reply(waiter_call, 15)
    assert led["ok"], led
    assert led["value"]["pid"] == leader.pid
    assert waited["ok"], waited
    print(
        f"redis killed: leader answered {led['ended'] - killed:.3f} s, waiter {waited['ended'] - killed:.3f} s "
        f"after the kill; waiter's value from pid {waited['value']['pid']} (leader {leader.pid})"
    )
    # The waiter's subscriber lost its connection, which wakes it: it fails open to its own load
    # rather than waiting out the 10 s lease.
    assert waited["ended"] - killed < 5.0, f"the waiter answered {waited['ended'] - killed:.3f} s after the kill"
    assert waited["value"]["pid"] in (leader.pid, waiter.pid)

    own_redis.start()
    for w in (leader, waiter):
        assert w.request("ready", within=20, timeout=15)["ready"], "the subscriber came back"
    key2 = redis_key_for(own_redis, namespace, "k2")

    attempts: list[dict[str, Any]] = []

    def stored() -> bool:
        answer = leader.request("call", arg="k2")
        assert answer["ok"], answer
        attempts.append(answer)
        return own_raw.get(key2) is not None

    # Fresh connections after the restart: within a breaker cooldown or two, a load stores again.
    eventually(stored, "a fill after the restart", timeout=10, interval=0.2)
    print(f"redis restarted: stored again on call {len(attempts)} after the subscribers were back")
    reused = waiter.request("call", arg="k2")
    assert reused["ok"] and reused["calls"] == 0, f"the other process reads the fill from Redis: {reused}"


def redis_key_for(server: RedisServer, namespace: str, arg: str) -> str:
    cache = TieredCache(server.url, namespace=namespace, coherent=False)
    try:
        return redis_key(cache, arg)
    finally:
        cache.close()


# -- 6. no bus: losers poll --------------------------------------------------------------------


def test_without_the_bus_losers_poll_and_still_share_one_load(workers: Callable[..., list[Worker]]) -> None:
    procs = workers(PROCESSES, coherent=False)
    began = time.monotonic()
    totals, answers = run_stampede(procs, 20, 25, LOAD, prefix="p")
    summary = report("coherent=False stampede", totals, answers, time.monotonic() - began)
    assert all(t == 1 for t in totals), summary
    assert all(a["distinct_values"] == 1 for a in answers), summary
    # Polling: a loser of a 50 ms load looks again after 5, 10, 20, 40 ms...: several rounds.
    assert all(max(a["lease_waits"]) >= 2 for a in answers), summary
    assert all(sum(a["lease_timeouts"]) == 0 for a in answers), summary


# -- 7. an invalidation while a loser waits ------------------------------------------------------


def test_an_invalidation_during_the_load_wakes_waiters_and_refuses_the_stale_fill(
    workers: Callable[..., list[Worker]], local_cache: Callable[..., TieredCache], raw: redis.Redis, namespace: str
) -> None:
    """A leads a load that reads version 0 and then blocks; B waits for it. The test bumps the
    version to 1 and invalidates the key. B must not answer with version 0: the invalidation
    wakes it, the key is empty, it loads version 1 itself. A's fill is then refused (its
    marker is gone), so no call that starts after the invalidation sees version 0 anywhere:
    not even a new call in A while A's old load is still running (with ``wait=True`` every
    process has applied the invalidation when it returns, so that call must not join the old
    load)."""
    version_key = f"truth:{namespace}"
    raw.set(version_key, 0)
    a, b = workers(2, lease_ttl=10.0)
    cache = local_cache()
    key = redis_key(cache, "k")
    behave = {"announce": True, "version_key": version_key}
    a_call = a.send("call", arg="k", behave={**behave, "gate": "g"})
    assert a.started("k")["version"] == 0
    b_call = b.send("call", arg="k", behave=behave)
    wait_for_waiter(raw, key)
    assert not b.has_started("k"), "B waits for A rather than loading"

    raw.set(version_key, 1)
    result = cache.invalidate(key, wait=True, timeout=5)
    invalidated = time.monotonic()
    assert result.seq is not None and result.receivers == 3 and result.complete, result

    from_b = b.reply(b_call, 15)
    assert from_b["ok"], from_b
    assert from_b["value"]["version"] == 1, f"B answered with a value computed before the invalidation: {from_b}"
    assert from_b["calls"] == 1 and from_b["value"]["pid"] == b.pid, "B loaded the key itself"
    assert from_b["value"]["started"] > invalidated - 0.5  # its load began around the invalidation
    print(f"invalidation: B answered {from_b['ended'] - invalidated:.3f} s after the invalidation returned")
    assert from_b["ended"] - invalidated < 2.0, "the invalidation woke B (not the 10 s lease)"
    stored_by_b = raw.get(key)
    assert stored_by_b is not None and stored_by_b[:2] != b"\xc7\x00", stored_by_b

    # A's old load is still blocked: a call in A now starts after the invalidation.
    again_in_a = a.request("call", arg="k", within=5, behave=behave)
    assert again_in_a["ok"] and again_in_a["value"]["version"] == 1, f"a new call in A: {again_in_a}"
    assert again_in_a["calls"] == 1, "A read B's value rather than loading again"

    a.request("open", gate="g")
    from_a = a.reply(a_call, 15)
    assert from_a["ok"], from_a
    # A's own caller began before the invalidation, so its own (old) answer is allowed; but
    # its fill must have been refused: Redis still holds B's value.
    assert from_a["value"]["version"] == 0
    assert raw.get(key) == stored_by_b, "A's fill, computed before the invalidation, landed over B's"

    later = [w.request("call", arg="k") for w in (a, b, a, b)]

    @tiered(cache, name="stampede.f")
    def f(arg: str) -> Any:
        raise AssertionError("the value is in Redis")

    for answer in later:
        assert answer["ok"] and answer["value"]["version"] == 1, f"a call after the invalidation: {answer}"
    assert later[0]["calls"] == 1 and later[1]["calls"] == 1, "nobody loaded again"
    assert f("k")["version"] == 1


# -- a wait that runs out --------------------------------------------------------------------------


def test_a_waiter_whose_wait_runs_out_loads_without_storing(
    workers: Callable[..., list[Worker]], local_cache: Callable[..., TieredCache], raw: redis.Redis
) -> None:
    """The holder's lease (3 s) outlives the waiter's own lease_ttl (0.5 s): the waiter stops
    waiting after 0.5 s, loads, answers, and stores nothing (the key is still leased), and
    the holder's fill then lands."""
    (holder,) = workers(1, lease_ttl=3.0)
    (waiter,) = workers(1, lease_ttl=0.5)
    key = redis_key(local_cache(), "k")
    holder_call = holder.send("call", arg="k", behave={"announce": True, "gate": "g"})
    holder.started("k")
    marker = raw.get(key)
    assert marker is not None and marker[:2] == b"\xc7\x00", marker
    answer = waiter.request("call", arg="k", within=15)
    assert answer["ok"] and answer["calls"] == 1 and answer["value"]["pid"] == waiter.pid, answer
    assert 0.4 <= answer["elapsed"] < 2.0, f"the waiter gave up after {answer['elapsed']:.3f} s (lease_ttl 0.5 s)"
    assert answer["stats"]["lease_timeouts"] == 1, answer["stats"]
    assert raw.get(key) == marker, "the waiter stored nothing: the holder's lease is still there"
    holder.request("open", gate="g")
    held = holder.reply(holder_call, 10)
    assert held["ok"] and held["value"]["pid"] == holder.pid, held
    (reader,) = workers(1)
    read = reader.request("call", arg="k")
    assert read["ok"] and read["calls"] == 0 and read["value"] == held["value"], "the holder's fill landed"

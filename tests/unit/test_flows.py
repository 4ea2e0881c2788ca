"""The sans-I/O flows, stepped by hand with scripted replies (``tests.support.flows.Stepper``).

No driver, no threads, no Redis, no Lua, no timing: each test starts a flow over a ``Core``,
checks every step it yields (the Redis op and its keys, CALL, Wait, Spawn) and answers it as
Redis, the function or the caller would, on a frozen clock the test moves.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from tests.support import Clock
from tests.support.flows import Stepper
from tiercache import BackendError, LoadTimeoutError, MsgpackSerializer, PickleSerializer, WriteResult, _remote
from tiercache._batchread import read_batch
from tiercache._codec import Codec
from tiercache._core import Core
from tiercache._keys import KeySpace, version_key
from tiercache._local import LocalCache
from tiercache._policy import Policy
from tiercache._read import read_through
from tiercache._remote import LEASE_PREFIX
from tiercache._scope import bump, scope_key
from tiercache._types import MISSING
from tiercache._write import delete, store

NS = "flows"
KEY = KeySpace(NS).user_key("item:1")
OTHER = KeySpace(NS).user_key("item:2")
WAITERS = KEY + ":w"  # the key's waiter flag (another process waits for our fill)
TTL, L1_TTL, LEASE_MS = 300.0, 60.0, 10_000
#: A decorated function's policy: Redis keeps its values 300 s, L1 60 s.
POLICY = Policy("item", TTL, L1_TTL)
# The Lua scripts, which the tests tell apart by identity (the op runs it by its SHA).
FILL, RELEASE, REPLACE = _remote._FILL_MANY, _remote._RELEASE_MANY, _remote._REPLACE
WAIT_LEASE, WRITE = _remote._WAIT, _remote._WRITE


def make_core(
    clock: Clock,
    *,
    strict: bool = False,
    coherent: bool = False,
    codec: Codec | None = None,
    breaker_threshold: int = 5,
    outage_ttl: float = 0.0,
) -> Core:
    """A Core as TieredCache builds one, with Redis configured (but never reached: the test
    answers its steps). ``coherent``: with a bus, whose subscription is not confirmed yet."""
    core = Core(
        namespace=NS,
        ttl=TTL,
        l1_ttl=L1_TTL,
        local=LocalCache(1000, None, clock),
        codec=codec if codec is not None else Codec(MsgpackSerializer()),
        has_remote=True,
        coherent=coherent,
        strict=strict,
        clock=clock,
        lease_ttl=LEASE_MS / 1000.0,
        breaker_threshold=breaker_threshold,
        breaker_cooldown=1.0,
    )
    core.local.outage_ttl = outage_ttl
    return core


@pytest.fixture
def clock() -> Clock:
    """Stands still: only the test moves it (``clock.advance``)."""
    return Clock(frozen=True)


@pytest.fixture
def core(clock: Clock) -> Core:
    return make_core(clock)


def ttl_in_l1(core: Core, key: str) -> float | None:
    return core.local.ttl_left(key)


# -- invariant 3: a fill overtaken by a write ----------------------------------------------------


def test_a_fill_refused_by_redis_is_returned_but_not_kept(core: Core) -> None:
    """Invariant 3: a write of the key while the function ran replaced our lease marker, so the
    fill script refuses the result: the caller gets it, L1 does not keep it."""
    flow = Stepper(read_through(core, KEY, POLICY, True))
    flow.redis("SET", KEY, keys=[KEY]).send(True)  # a miss: our lease marker is in the key now
    flow.call().send("computed")
    flow.redis(script=FILL, keys=[KEY, WAITERS]).answer(0)  # a write replaced the marker: refused
    assert flow.result == "computed"
    assert core.local.entry(KEY) is None
    assert core.stats().in_flight == 0


def test_a_write_here_during_a_load_wins_in_l1(core: Core) -> None:
    """The same race with the write made by this process, interleaving the two flows: L1 ends
    with the written value, never the load's."""
    load = Stepper(read_through(core, KEY, POLICY, True))
    load.redis("SET", KEY).send(True)
    load.call()  # the function runs...
    write = Stepper(store(core, KEY, "written", None, None, None))  # ...when the key is set here
    write.redis(script=WRITE).answer([5, 1])
    assert write.result == WriteResult(5, 1)
    load.send("computed")
    load.redis(script=FILL, keys=[KEY, WAITERS]).answer(0)  # the write replaced our marker
    assert load.result == "computed"
    assert core.local.get(KEY) == "written"


def test_an_invalidation_during_a_load_keeps_its_result_out_of_l1(core: Core) -> None:
    """Invariant 2: another process's invalidation arrives (on the bus) while the function runs;
    even if the fill lands in Redis, this process's L1 does not take the result."""
    flow = Stepper(read_through(core, KEY, POLICY, True))
    flow.redis("SET", KEY).send(True)
    flow.call()
    core.flights.evict([KEY])  # what the bus does with an invalidation of the key
    flow.send("computed")
    flow.redis(script=FILL).answer(1)
    assert flow.result == "computed"
    assert core.local.entry(KEY) is None


# -- reads -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pttl_ms", "in_l1"),
    [(5_000, 5.0), (120_000, L1_TTL), (-1, L1_TTL), (0, None)],
    ids=["redis-ttl-shorter", "l1-ttl-shorter", "no-expiry-in-redis", "expiring-now"],
)
def test_an_l2_hit_fills_l1_for_min_of_l1_ttl_and_pttl_from_when_the_read_was_sent(
    core: Core, clock: Clock, pttl_ms: int, in_l1: float | None
) -> None:
    data = core.codec.encode(KEY, {"v": 1})
    flow = Stepper(read_through(core, KEY, POLICY, True))
    sent = clock.now
    flow.redis("SET", KEY, keys=[KEY])  # one round trip: the value and its PTTL (the lease if empty)
    assert flow.op.args[3:] == ("NX", "PX", LEASE_MS, "GET")
    assert flow.op.more == (("PTTL", KEY),)
    clock.advance(0.25)  # the reply (and the decoding) took a while
    flow.send((data, pttl_ms))
    assert flow.result == {"v": 1}
    left = ttl_in_l1(core, KEY)
    if in_l1 is None:
        assert left is None
    else:  # counted from when the read was sent, not from the reply
        assert left is not None
        assert clock.now + left == pytest.approx(sent + in_l1)
    stats = core.stats()
    assert (stats.l2_hits, stats.misses, stats.loads) == (1, 0, 0)


def test_cache_get_reads_without_taking_the_lease(core: Core) -> None:
    """``cache.get`` (load=False) peeks: GET and PTTL, no lease; a miss is MISSING, nothing called."""
    flow = Stepper(read_through(core, KEY, core.default_policy, False))
    flow.redis("GET", KEY, keys=[KEY]).answer([None, -2])
    assert flow.result is MISSING
    assert core.stats().misses == 1


def test_a_miss_takes_the_lease_calls_the_function_and_fills(core: Core, clock: Clock) -> None:
    flow = Stepper(read_through(core, KEY, POLICY, True))
    marker = flow.op.args[2]
    assert marker.startswith(LEASE_PREFIX)
    flow.redis("SET", KEY, marker).answer([None, -2])  # empty (so SET NX took it): the lease is ours
    flow.call().send("computed")
    flow.redis(script=FILL, keys=[KEY, WAITERS])
    fill = flow.op.args
    assert fill[5:9] == (marker, int(TTL * 1000), core.channel, core.node_id)  # only over our marker
    assert core.codec.decode(KEY, fill[9]) == "computed"
    clock.advance(0.5)  # the fill's round trip
    flow.answer(1)
    assert flow.result == "computed"
    assert ttl_in_l1(core, KEY) == pytest.approx(L1_TTL - 0.5)  # from when the fill was sent
    stats = core.stats()
    assert (stats.misses, stats.loads, stats.l2_hits, stats.in_flight) == (1, 1, 0, 0)


def test_a_function_that_raises_gives_the_lease_back(core: Core) -> None:
    flow = Stepper(read_through(core, KEY, POLICY, True))
    marker = flow.op.args[2]
    flow.redis("SET", KEY).send(True)
    flow.call().throw(ValueError("no such item"))
    flow.redis(script=RELEASE, keys=[KEY, WAITERS])  # announced to waiters, if any
    assert flow.op.args[5] == marker  # deletes only our own marker
    with pytest.raises(ValueError, match="no such item"):
        flow.answer(0)
    stats = core.stats()
    assert (stats.loads, stats.load_errors, stats.in_flight) == (1, 1, 0)


def test_an_unencodable_result_is_returned_and_the_lease_given_back(core: Core) -> None:
    flow = Stepper(read_through(core, KEY, POLICY, True))
    flow.redis("SET", KEY).send(True)
    flow.call().send(object())  # msgpack cannot encode it
    flow.redis(script=RELEASE, keys=[KEY, WAITERS]).answer(0)
    assert type(flow.result) is object
    assert core.local.entry(KEY) is None
    assert core.stats().not_cached == 1


# -- Redis failing ---------------------------------------------------------------------------


def test_redis_failing_fails_open_counts_and_opens_the_breaker(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    core = make_core(clock, breaker_threshold=2)
    first = Stepper(read_through(core, KEY, POLICY, True))
    with caplog.at_level(logging.WARNING, logger="tiercache"):
        first.fail(ConnectionError("connection refused"))
    first.call().send("computed")  # no lease, so no fill script: straight to the caller
    assert first.result == "computed"
    assert core.stats().backend_errors == 1
    assert "Redis SET failed, answering without it: ConnectionError: connection refused" in caplog.text
    assert not core.breaker.is_open

    second = Stepper(read_through(core, OTHER, POLICY, True))
    second.fail()
    second.call().send("other")
    assert core.breaker.is_open  # two failures in a row

    third = Stepper(read_through(core, KeySpace(NS).user_key("item:3"), POLICY, True))
    third.call().send("third")  # the breaker is open: not even a read is tried
    assert third.result == "third"
    assert core.stats().backend_errors == 2

    clock.advance(1.0)  # the cooldown passed: one call probes Redis, and its success closes it
    probe = Stepper(read_through(core, KeySpace(NS).user_key("item:4"), POLICY, True))
    probe.redis("SET").send(True)
    probe.call().send("fourth")
    probe.redis(script=FILL).answer(1)
    assert probe.result == "fourth"
    assert not core.breaker.is_open


def test_strict_mode_raises_backend_error_after_giving_the_lease_back(clock: Clock) -> None:
    core = make_core(clock, strict=True)
    flow = Stepper(read_through(core, KEY, POLICY, True))
    flow.fail(ConnectionError("connection refused"))
    # Whether our SET NX landed is unknown: the marker is given back, quietly, before raising.
    flow.redis(script=RELEASE, keys=[KEY, WAITERS])
    with pytest.raises(BackendError, match="Redis SET failed: ConnectionError: connection refused") as raised:
        flow.fail()  # the release fails too: counted, never raised in place of the first error
    assert isinstance(raised.value.__cause__, ConnectionError)
    assert core.stats().backend_errors == 2
    assert core.stats().in_flight == 0


def test_strict_mode_with_the_breaker_open_raises_before_any_step(clock: Clock) -> None:
    core = make_core(clock, strict=True, breaker_threshold=1)
    first = Stepper(read_through(core, KEY, POLICY, True))
    with pytest.raises(BackendError, match="Redis SET failed"):
        first.fail()  # opens the breaker, so the quiet release is not even sent
    with pytest.raises(BackendError, match="circuit breaker is open") as raised:
        Stepper(read_through(core, OTHER, POLICY, True))
    assert isinstance(raised.value.__cause__, ConnectionError)


def test_an_outage_caps_l1_entries_at_outage_ttl(clock: Clock) -> None:
    """Redis down and the bus with it (L1 not accepting): nobody can publish an invalidation,
    so L1 keeps what the function returns, but for ``outage_ttl`` at most."""
    core = make_core(clock, coherent=True, breaker_threshold=1, outage_ttl=2.0)
    assert not core.local.accepting  # the bus has not confirmed a subscription
    first = Stepper(read_through(core, KEY, POLICY, True))
    first.fail()
    first.call().send("a")
    assert core.breaker.is_open
    second = Stepper(read_through(core, OTHER, POLICY, True))
    second.call().send("b")  # the breaker is open: straight to the function
    assert (first.result, second.result) == ("a", "b")
    assert ttl_in_l1(core, KEY) == ttl_in_l1(core, OTHER) == 2.0  # not L1_TTL
    clock.advance(2.0)
    assert core.local.get(KEY) is MISSING


def test_the_bus_down_while_redis_answers_keeps_nothing_in_l1(clock: Clock) -> None:
    """Not an outage: another process may publish an invalidation this one would miss."""
    core = make_core(clock, coherent=True, outage_ttl=2.0)
    flow = Stepper(read_through(core, KEY, POLICY, True))
    flow.redis("SET", KEY).send((core.codec.encode(KEY, "v"), 50_000))
    assert flow.result == "v"
    assert core.local.entry(KEY) is None


# -- another process's lease -------------------------------------------------------------------


def test_a_lease_held_elsewhere_is_waited_for_then_its_fill_read(clock: Clock) -> None:
    core = make_core(clock, coherent=True)
    assert core.bus is not None
    core.bus.subscribed(0)  # the bus is up: the holder's fill will be announced on it
    flow = Stepper(read_through(core, KEY, POLICY, True))
    marker = flow.op.args[2]
    flow.redis("SET", KEY).send(False)  # another process's marker is in the key
    flow.redis(script=WAIT_LEASE, keys=[KEY, WAITERS])  # look again, and raise our waiter flag
    assert flow.op.args[5:] == (marker, LEASE_MS, LEASE_PREFIX, marker[: marker.rindex(b":") + 1])
    flow.send(800)  # that lease has 800 ms left
    flow.wait(timeout=0.801)
    signal = flow.waiting.flight
    assert not signal.done
    core.flights.announced([KEY])  # the holder's fill, announced on the bus
    assert signal.done
    flow.send(None)
    sent = clock.now
    flow.redis(script=WAIT_LEASE, keys=[KEY, WAITERS]).send((core.codec.encode(KEY, "theirs"), 4_000))
    assert flow.result == "theirs"
    assert ttl_in_l1(core, KEY) == pytest.approx(sent + 4.0 - clock.now)  # min(l1_ttl, pttl)
    stats = core.stats()
    assert (stats.lease_waits, stats.l2_hits, stats.loads) == (1, 1, 0)


def test_a_lease_wait_without_a_bus_polls_with_backoff_then_takes_the_lease(core: Core) -> None:
    flow = Stepper(read_through(core, KEY, POLICY, True))
    flow.redis("SET", KEY).send(False)
    flow.redis(script=WAIT_LEASE).send(800)
    flow.wait(timeout=0.005).send(None)  # nothing would announce the fill: look again soon
    flow.redis(script=WAIT_LEASE).send(700)
    flow.wait(timeout=0.01).send(None)
    flow.redis(script=WAIT_LEASE).send(True)  # the holder released (or died): the lease is ours
    flow.call().send("mine")
    flow.redis(script=FILL, keys=[KEY, WAITERS]).answer(1)
    assert flow.result == "mine"
    assert core.stats().lease_waits == 2


# -- unreadable values -------------------------------------------------------------------------

_executed: list[str] = []


def _run(what: str) -> None:
    _executed.append(what)


class _Exploit:
    """Pickled, it runs ``_run`` when loaded."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return _run, ("ran",)


def test_an_unreadable_value_is_a_miss_never_executed_and_replaced(clock: Clock) -> None:
    core = make_core(clock, codec=Codec(PickleSerializer(), signing_key=b"k" * 32))
    forged = Codec(PickleSerializer(), signing_key=b"x" * 32).encode(KEY, _Exploit())  # signed, not by us
    flow = Stepper(read_through(core, KEY, POLICY, True))
    flow.redis("SET", KEY).send((forged, 50_000))
    flow.call().send("fresh")  # a miss: the function computes it
    flow.redis(script=REPLACE, keys=[KEY])  # over those very bytes only (unless written since)
    assert flow.op.args[4] == forged
    flow.answer(1)
    assert flow.result == "fresh"
    assert _executed == []  # the bad signature kept them from being unpickled
    assert core.local.get(KEY) == "fresh"
    stats = core.stats()
    assert (stats.codec_errors, stats.misses, stats.l2_hits, stats.loads) == (1, 1, 0, 1)


# -- cancellation ------------------------------------------------------------------------------


#: A GeneratorExit thrown into a flow reaches ``_load`` as a ``close()`` (PEP 380: ``yield from``
#: closes the inner generator), where it may not yield: no release step could be sent. So the
#: drivers never throw it in: the async driver finishes the flow of a closed coroutine as a
#: cancelled one, on a task (test_hangs.py::test_a_closed_coroutine_gives_its_lease_back).
#: This marks that a flow itself cannot do it.
_CLOSED = pytest.param(
    GeneratorExit,
    marks=pytest.mark.xfail(strict=True, raises=RuntimeError, reason="a flow cannot yield on GeneratorExit"),
)


class Interrupted(BaseException):
    """Stands for KeyboardInterrupt or SystemExit (which, escaping a test, would stop the run)."""


@pytest.mark.parametrize("cancel", [asyncio.CancelledError, Interrupted, _CLOSED])
def test_a_load_cancelled_after_taking_the_lease_gives_it_back(core: Core, cancel: type[BaseException]) -> None:
    flow = Stepper(read_through(core, KEY, POLICY, True))
    marker = flow.op.args[2]
    flow.redis("SET", KEY).send(True)  # the lease is ours
    flow.call().throw(cancel())  # the caller is cancelled while the function runs
    flow.redis(script=RELEASE, keys=[KEY, WAITERS])  # rather than leave everyone waiting lease_ttl
    assert flow.op.args[5] == marker
    with pytest.raises(cancel):
        flow.answer(0)
    stats = core.stats()
    assert (stats.in_flight, stats.load_errors) == (0, 0)  # abandoned, not failed


def test_a_hard_timeout_detaches_the_load_and_gives_its_lease_back(core: Core, clock: Clock) -> None:
    """With timeouts the load is spawned and the caller waits for it; past ``hard_timeout`` the
    caller gives up (and the lease back), and the late result is stored nowhere."""
    policy = Policy("slow", TTL, L1_TTL, hard_timeout=1.0)
    flow = Stepper(read_through(core, KEY, policy, True))
    load = Stepper(flow.spawned.flow)  # the detached load, stepped like any flow
    load.redis("SET", KEY).send(True)
    load.call()  # the function runs...
    flow.send(None).wait(timeout=1.0)
    clock.advance(1.0)
    flow.send(True)  # ...past the timeout
    flow.redis(script=RELEASE, keys=[KEY, WAITERS])
    with pytest.raises(LoadTimeoutError, match=r"hard_timeout=1\.0 s"):
        flow.answer(0)
    load.send("late")
    load.redis(script=RELEASE, keys=[KEY, WAITERS]).answer(0)  # not the fill script
    assert load.result == "late"
    assert core.local.entry(KEY) is None
    assert core.stats().load_timeouts == 1


# -- writes ------------------------------------------------------------------------------------


def test_set_is_one_script_then_l1(core: Core, clock: Clock) -> None:
    flow = Stepper(store(core, KEY, "new", None, None, None))
    flow.redis(script=WRITE, keys=[core.seq_key, KEY, KEY + ":r"])  # the value, and any refresh token
    args = flow.op.args
    assert args[6:11] == (core.node_id, core.channel, "set", int(TTL * 1000), "")  # no acks awaited
    assert core.codec.decode(KEY, args[11]) == "new"
    clock.advance(0.5)
    flow.answer([7, 2])  # the message's sequence number, and PUBLISH's receivers
    assert flow.result == WriteResult(7, 2, None)
    assert core.local.get(KEY) == "new"
    assert ttl_in_l1(core, KEY) == pytest.approx(L1_TTL - 0.5)  # from when the write was sent


def test_delete_is_one_script_then_evicts(core: Core) -> None:
    core.local.put(KEY, "old", L1_TTL, 3)
    flow = Stepper(delete(core, [KEY, OTHER], None))
    flow.redis(script=WRITE, keys=[core.seq_key, KEY, KEY + ":r", OTHER, OTHER + ":r"])
    assert flow.op.args[10] == "del"
    flow.answer([8, 1])
    assert flow.result == WriteResult(8, 1, None)
    assert core.local.entry(KEY) is None


def test_a_write_redis_refuses_leaves_l1_without_the_key(core: Core) -> None:
    core.local.put(KEY, "old", L1_TTL, 3)
    flow = Stepper(store(core, KEY, "new", None, None, None))
    flow.fail()
    assert flow.result == WriteResult(None, None, None)
    assert core.local.entry(KEY) is None  # not in Redis, so not in L1 either


def test_a_tag_bump_changes_the_scoped_key(core: Core) -> None:
    tag = version_key(NS, "tag", "books")
    before = Stepper(scope_key(core, KEY, None, [tag]))
    before.redis("MGET", tag, keys=[tag]).answer([b"3"])
    again = Stepper(scope_key(core, KEY, None, [tag]))
    assert again.result == before.result  # the version is in L1 now: no Redis step
    flow = Stepper(bump(core, [tag], None))
    flow.redis(script=WRITE, keys=[core.seq_key, tag, tag + ":r"])
    assert flow.op.args[8] == "incr"
    flow.answer([9, 1])
    assert flow.result == WriteResult(9, 1, None)
    after = Stepper(scope_key(core, KEY, None, [tag]))
    after.redis("MGET", tag).answer([b"4"])  # the bump evicted the version here
    assert after.result != before.result
    assert after.result is not None


# -- batch reads -------------------------------------------------------------------------------


def test_a_batch_reads_in_one_round_trip_and_computes_only_the_misses(core: Core) -> None:
    flow = Stepper(read_batch(core, [KEY, OTHER], ["one", "two"], POLICY, "batch"))
    flow.redis("SET", KEY, keys=[KEY, OTHER])  # one pipeline: SET NX GET and PTTL per key
    flow.send([(core.codec.encode(KEY, "ONE"), 50_000), True])  # a hit, and a miss now leased
    flow.call_with(["two"]).send(["TWO"])  # the function, for the miss alone
    flow.redis(script=FILL, keys=[OTHER, OTHER + ":w"]).answer(1)
    assert flow.result == {KEY: "ONE", OTHER: "TWO"}
    assert (core.local.get(KEY), core.local.get(OTHER)) == ("ONE", "TWO")
    stats = core.stats()
    assert (stats.l2_hits, stats.misses, stats.loads) == (1, 1, 1)

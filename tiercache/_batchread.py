"""The batch read (``@tiered_batch``): many keys at once, item by item. L1 first; the rest
single-flighted per item within the process; the keys this call leads read from Redis in one
pipelined round trip that takes each empty key's lease; the items still missing computed by
one call of the function, stored with one script (only where our lease still holds:
invariant 3) and put into L1 unless an invalidation overtook them. It shares the single-key
read's helpers (``Core.decode``, ``Core.call``, ``Core.release``, ``pttl_seconds``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from . import _remote
from ._core import LOADING, Core, ms, pttl_seconds
from ._flight import Flight
from ._policy import Policy
from ._steps import CallWith, Flow
from ._types import FAILED, MISSING, SKIPPED

__all__ = ["read_batch"]

#: What goes into L1 for a key: (value, expires, held size).
_Entry = tuple[Any, float, int]


def read_batch(
    core: Core, keys: Sequence[str], items: Sequence[Any], policy: Policy, name: str
) -> Flow[dict[str, Any]]:
    """The values of ``keys`` (distinct; ``items[i]`` is what the function needs to compute
    ``keys[i]``). Single-flight per item: lead the keys no other call here is loading, join
    the rest; items whose call failed or was cancelled go round again (led or joined anew)."""
    results: dict[str, Any] = {}
    pending = _from_l1(core, keys, range(len(keys)), results)
    core.counters.l1_hits += len(results)
    first = True
    outwaited: set[int] = set()  # items whose wait passed lease_ttl once (see Core.await_leader)
    while pending:
        if not first:  # a retry: the value may have landed in L1 meanwhile
            pending = _from_l1(core, keys, pending, results)
        first = False
        led: list[tuple[int, Flight]] = []
        joined: list[tuple[int, Flight]] = []
        # Items this context is computing (the batch function called itself with them), or
        # whose load only this thread could finish: loaded here, joining nothing.
        loading = LOADING.get()
        alone = [i for i in pending if keys[i] in loading]
        for i in pending:
            if keys[i] not in loading:
                flight, leader = core.flights.lead_or_join(keys[i])
                (led if leader else joined).append((i, flight))
        if led:
            results.update((yield from _lead(core, keys, items, led, policy, name)))
        pending = yield from _join(core, keys, joined, results, alone, outwaited)
        if alone:
            results.update((yield from _load(core, [keys[i] for i in alone], [items[i] for i in alone], policy, name)))
    return results


def _join(
    core: Core,
    keys: Sequence[str],
    joined: list[tuple[int, Flight]],
    results: dict[str, Any],
    alone: list[int],
    outwaited: set[int],
) -> Flow[list[int]]:
    """Wait for the loads other calls lead, putting their values into ``results``; items this
    caller may not wait for go to ``alone``; returns the items to go round again (their load
    failed, was cancelled, or outlasted ``lease_ttl``)."""
    again = []
    for i, flight in joined:
        if not (yield from core.await_leader(flight, i not in outwaited)):  # see _sync.wait
            alone.append(i)
        elif not flight.done:
            outwaited.add(i)
            again.append(i)
        elif flight.error is None and not flight.abandoned and flight.value is not MISSING:
            results[keys[i]] = flight.value
        else:
            again.append(i)
    return again


def _from_l1(core: Core, keys: Sequence[str], indices: Sequence[int], results: dict[str, Any]) -> list[int]:
    """Put the L1 values of ``keys[i]`` into ``results``; the indices that missed."""
    missing = []
    get = core.local.get
    for i in indices:
        value = get(keys[i])
        if value is MISSING:
            missing.append(i)
        else:
            results[keys[i]] = value
    return missing


def _lead(
    core: Core,
    keys: Sequence[str],
    items: Sequence[Any],
    led: list[tuple[int, Flight]],
    policy: Policy,
    name: str,
) -> Flow[dict[str, Any]]:
    """Load the items this call leads, and end their flights whatever happens."""
    try:
        got = yield from _load(core, [keys[i] for i, _ in led], [items[i] for i, _ in led], policy, name)
    except BaseException as exc:
        for _, flight in led:
            core.flights.release(flight)
            if isinstance(exc, Exception):
                flight.fail(exc)
            else:
                flight.abandon()
        raise
    for i, flight in led:
        core.flights.release(flight)
        flight.finish(got[keys[i]])
    return got


def _load(core: Core, keys: Sequence[str], items: Sequence[Any], policy: Policy, name: str) -> Flow[dict[str, Any]]:
    """Keys missing from L1 that this call loads: one pipelined read taking each empty key's
    lease, then one call of the function for what is still missing."""
    results: dict[str, Any] = {}
    marker = core.mint_marker()
    watches = core.flights.watch(keys)
    entries: dict[str, _Entry] = {}
    leased: list[str] = []
    try:
        op = _remote.fetch_many(keys, marker, core.lease_ms)
        sent_at = core.clock()
        leased = list(keys)  # until the reply says which: cancelled meanwhile, free them all
        found = core.settle(op, (yield op) if core.allow() else SKIPPED)
        replies = [FAILED] * len(keys) if found is FAILED else found
        load, leased, unreadable = _sort(core, keys, replies, policy, sent_at, results, entries)
        if load:
            values = yield from _compute(core, [keys[i] for i in load], [items[i] for i in load], policy, name)
            unstored = yield from _store(core, values, leased, unreadable, marker, policy, entries)
            leased = []
            if unstored:
                yield from core.release(unstored, marker)
            results.update(values)
    except BaseException:
        core.flights.unwatch(watches)
        if leased:
            yield from core.release(leased, marker)
        raise
    core.flights.fill_each(watches, entries)
    return results


def _sort(
    core: Core,
    keys: Sequence[str],
    replies: Sequence[Any],
    policy: Policy,
    sent_at: float,
    results: dict[str, Any],
    entries: dict[str, _Entry],
) -> tuple[list[int], list[str], dict[str, bytes]]:
    """Sort the read's replies: hits into ``results`` and ``entries``; the rest to load, the
    keys whose lease we took, and the unreadable bytes found."""
    load: list[int] = []
    leased: list[str] = []
    unreadable: dict[str, bytes] = {}
    for i, (key, got) in enumerate(zip(keys, replies, strict=True)):
        if isinstance(got, tuple):
            data, pttl = got
            value = core.decode(key, data)
            if value is not MISSING:
                results[key] = value
                left = pttl_seconds(pttl)
                entries[key] = (value, sent_at + min(policy.l1_ttl, left), core.codec.held_size(data))
                continue
            unreadable[key] = data
        elif got is True:
            leased.append(key)
        load.append(i)
    core.counters.l2_hits += len(keys) - len(load)
    core.counters.misses += len(load)
    return load, leased, unreadable


def _compute(core: Core, keys: list[str], items: list[Any], policy: Policy, name: str) -> Flow[dict[str, Any]]:
    """One call of the batch function with ``items``: each key's result."""
    values = yield from core.call(policy, CallWith(items), keys)
    if not isinstance(values, (list, tuple)) or len(values) != len(items):
        got_len = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
        raise TypeError(
            f"{name} returned {got_len} results for {len(items)} items: "
            "a batch function must return a list with one result per item, in order"
        )
    return dict(zip(keys, values, strict=True))


def _store(
    core: Core,
    values: dict[str, Any],
    leased: list[str],
    unreadable: dict[str, bytes],
    marker: bytes,
    policy: Policy,
    entries: dict[str, _Entry],
) -> Flow[list[str]]:
    """Store the computed ``values`` in Redis (one script where our lease holds, one replace
    per unreadable key) and note their L1 entries. Returns the leased keys whose value
    cannot be cached (their lease is to be given back)."""
    datas: dict[str, bytes] = {}
    for key, value in values.items():
        data = core.encode_or_none(key, value)
        if data is not None:
            datas[key] = data
    ttl_s = policy.l2_ttl()
    sent_at = core.clock()
    store = [k for k in leased if k in datas]
    if store:
        op = _remote.fill_many(store, marker, [datas[k] for k in store], ms(ttl_s), core.channel, core.node_id)
        core.settle(op, (yield op) if core.allow() else SKIPPED)
    for k, old in unreadable.items():  # unless someone wrote the key meanwhile
        if k in datas:
            op = _remote.replace(k, old, datas[k], ms(ttl_s))
            core.settle(op, (yield op) if core.allow() else SKIPPED)
    for k, data in datas.items():
        entries[k] = (values[k], sent_at + min(policy.l1_ttl, ttl_s), core.codec.held_size(data))
    return [k for k in leased if k not in datas]

"""Writes: ``set``, ``delete`` (and invalidations), refreshes, and waiting for the other
processes' acknowledgements. Redis first (one script: write, sequence number, publish), then
this process's L1, through watches an invalidation meanwhile dirties (invariant 3)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from . import _remote
from ._coherence import WriteResult
from ._core import Core, ms
from ._flight import Flight
from ._policy import Policy
from ._steps import Flow
from ._types import CALL, FAILED, MISSING, SKIPPED

__all__ = ["await_acks", "delete", "refresh", "store", "write"]


def store(
    core: Core, key: str, value: Any, ttl: float | None, l1_ttl: float | None, wait: float | None
) -> Flow[WriteResult]:
    """``cache.set``: write ``value`` to Redis, broadcast the invalidation, then keep it in L1."""
    data = core.codec.encode(key, value)  # an explicit set of an unencodable value raises
    return (yield from write(core, [key], [data], core.ttl if ttl is None else ttl, [value], l1_ttl, wait))


def delete(core: Core, keys: Sequence[str], wait: float | None) -> Flow[WriteResult]:
    """Delete ``keys`` from Redis, broadcast the invalidation, evict them here."""
    if not keys:
        return WriteResult(None, 0, None)
    return (yield from write(core, keys, None, 0.0, None, None, wait))


def write(
    core: Core,
    keys: Sequence[str],
    datas: Sequence[bytes] | None,
    ttl: float,
    values: Sequence[Any] | None,
    l1_ttl: float | None,
    wait: float | None,
    incr: bool = False,
) -> Flow[WriteResult]:
    """Redis first (one script: write, sequence number, publish), then this process's L1.

    ``wait`` (seconds): also wait until every subscriber that received the message has
    acknowledged applying it, or until that many seconds passed. ``incr``: increment the
    keys (version counters) instead.
    """
    ack_key = core.ack_key(wait)
    watches = core.flights.watch(keys)
    sent_at = core.clock()
    op = _remote.write(core.seq_key, core.channel, core.node_id, keys, datas, ms(ttl), ack_key, incr)
    try:
        reply = core.settle(op, (yield op) if core.allow() else SKIPPED)
    except BaseException:
        core.flights.abort_write(watches)
        raise
    if reply is FAILED and core.has_remote:
        # Not in Redis, so not in L1 either; other nodes keep what they had until their TTL
        # or their next message (fail open cannot tell them).
        core.flights.abort_write(watches)
        return WriteResult(None, None, None)
    sizes = [core.codec.held_size(d) for d in datas] if datas is not None else []
    # as in a load: counted from before the request, so never past the Redis copy
    core.flights.commit_write(watches, values, sent_at + min(core.l1_ttl_or(l1_ttl), ttl), sizes)
    if reply is FAILED:  # L1-only cache
        return WriteResult(None, None, None)
    seq, receivers = reply
    return (yield from acknowledged(core, seq, receivers, ack_key, wait))


def acknowledged(core: Core, seq: int, receivers: int, ack_key: str, wait: float | None) -> Flow[WriteResult]:
    """The result of a published write: with ``wait``, once its receivers acknowledged it."""
    if wait is None:
        return WriteResult(seq, receivers)
    return WriteResult(seq, receivers, (yield from await_acks(core, ack_key, receivers, wait)))


def await_acks(core: Core, ack_key: str, expected: int, timeout: float) -> Flow[int]:
    """Collect up to ``expected`` acknowledgements from the write's list within ``timeout``.

    They wait in Redis, so none is lost while this process's own subscriber reconnects.
    BLPOP blocks in short slices, well inside the socket timeout of the connection."""
    acked = 0
    deadline = core.clock() + timeout
    while acked < expected:
        left = deadline - core.clock()
        if left <= 0:
            break
        op = _remote.await_ack(ack_key, min(left, core.block_slice))
        got = core.settle(op, (yield op) if core.allow() else SKIPPED)
        if got is FAILED:
            break
        acked += got
        if got and acked < expected:
            op = _remote.take_acks(ack_key, expected - acked)
            more = core.settle(op, (yield op) if core.allow() else SKIPPED)
            acked += 0 if more is FAILED else more
    return min(acked, expected)


def refresh(core: Core, key: str, policy: Policy, exclusive: bool = False) -> Flow[Any]:
    """Call the function now and write its result to both tiers, telling every node.

    The old value keeps being served meanwhile. Invariant 3: a write or invalidation of
    the key while the function runs wins: the refresh's result is returned to its caller
    but stored nowhere (Redis refuses it, and the local watch keeps it out of L1).
    ``exclusive`` (refresh-ahead): only if no other process is refreshing the key, else
    return MISSING without calling the function."""
    token = core.mint_marker()
    watches = core.flights.watch([key])
    try:
        op = _remote.begin_refresh(key, token, core.lease_ms, exclusive)
        begun = core.settle(op, (yield op) if core.allow() else SKIPPED)
        if begun is False:
            core.flights.unwatch(watches)
            return MISSING
        try:
            value = yield from core.call(policy, CALL)
        except BaseException:
            if begun is True:  # let the next refresh (maybe in another process) run now
                yield from core.quietly(_remote.abandon_refresh(key, token))
            raise
        data = core.encode_or_none(key, value)
        ttl_s = policy.l2_ttl()
        sent_at = core.clock()
        if data is None or (begun is FAILED and core.has_remote):
            core.flights.abort_write(watches)
            return value
        if core.has_remote:
            op = _remote.finish_refresh(core.seq_key, core.channel, core.node_id, key, token, data, ms(ttl_s))
            reply = core.settle(op, (yield op) if core.allow() else SKIPPED)
            if reply is FAILED or reply is False:
                core.flights.abort_write(watches)
                return value
    except BaseException:
        core.flights.abort_write(watches)
        raise
    _commit_refresh(core, watches, value, data, policy, sent_at, ttl_s)
    return value


def _commit_refresh(
    core: Core, watches: list[Flight], value: Any, data: bytes, policy: Policy, sent_at: float, ttl_s: float
) -> None:
    expires = sent_at + ttl_s
    core.flights.commit_write(
        watches,
        [value],
        sent_at + min(policy.l1_ttl, ttl_s),
        [core.codec.held_size(data)],
        policy.fresh_until(expires),
        expires + policy.stale_ttl if policy.stale_ttl else None,
    )

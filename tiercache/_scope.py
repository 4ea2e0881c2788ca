"""Scopes: tag and tenant versions (which the scoped keys embed) and the namespace's
generation. Invalidating a tag, a tenant or the whole namespace is one counter's increment,
O(1) in the number of entries: the old keys are never read again and expire by their TTL."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from . import _read, _remote, _write
from ._coherence import WriteResult
from ._core import Core
from ._keys import scoped_key
from ._policy import Policy
from ._steps import Flow
from ._types import CALL, FAILED, MISSING, SKIPPED

__all__ = [
    "bump",
    "cached_versions",
    "clear",
    "in_scope",
    "known_versions",
    "scope_key",
    "scoped_read",
    "versions",
]

R = TypeVar("R")

#: Most versions remembered as the last known (``known_versions``); then forgotten at once.
_KNOWN_MAX = 4096


def cached_versions(core: Core, names: Sequence[str]) -> list[int] | None:
    """The versions of ``names`` (tag and tenant counters) if L1 has them all, else None."""
    if not core.has_remote:
        return [core.local_versions.get(n, 0) for n in names]
    return core.local.fresh_values(names)


def known_versions(core: Core, names: Sequence[str]) -> list[int]:
    """The last versions of ``names`` this process saw, expired or not (0 when never seen):
    the best guess at a scope while Redis cannot be read."""
    known = core.last_versions
    return [known.get(name, 0) for name in names]


def versions(core: Core, names: Sequence[str]) -> Flow[list[int] | None]:
    """The versions of ``names``: from L1, else one MGET (cached in L1 for ``l1_ttl``, unless
    an invalidation of a counter overtook the read). None when Redis cannot say: the call
    then must not use the cache (its key is unknown)."""
    cached = cached_versions(core, names)
    if cached is not None:
        return cached
    watches = core.flights.watch(names)
    sent_at = core.clock()
    op = _remote.versions(names)
    try:
        got = core.settle(op, (yield op) if core.allow() else SKIPPED)
    except BaseException:
        core.flights.unwatch(watches)
        raise
    if got is FAILED:
        core.flights.unwatch(watches)
        return None
    expires = sent_at + core.l1_ttl
    core.flights.fill_each(watches, {n: (v, expires, 8) for n, v in zip(names, got, strict=True)})
    if len(core.last_versions) >= _KNOWN_MAX:
        core.last_versions.clear()
    core.last_versions.update(zip(names, got, strict=True))
    return list(got)


def scoped_read(core: Core, base: str, tenant: str | None, names: Sequence[str], policy: Policy) -> Flow[Any]:
    """``read_through`` of ``base`` in its scope (tenant, tag versions), loading them first."""
    found = yield from versions(core, names)
    local = core.local
    if found is None and core.bus is not None and not local.accepting and local.outage and local.outage_ttl:
        # An outage (the bus is down too): the last versions we knew make a key good for
        # this process's L1 alone, where it lives at most outage_ttl (see LocalCache), so
        # tagged and tenant calls protect the backend like the others.
        found = known_versions(core, names)
    if found is None:  # no versions, no key: answer from the function, cache nothing
        core.counters.misses += 1
        core.counters.loads += 1
        return (yield CALL)
    key = scoped_key(base, tenant, found)
    value = local.get(key)
    if value is not MISSING:
        core.counters.l1_hits += 1
        return value
    return (yield from _read.read_through(core, key, policy, True))


def scope_key(core: Core, base: str, tenant: str | None, names: Sequence[str]) -> Flow[str | None]:
    """The key of ``base`` in its scope now; None when the versions cannot be read."""
    if not names:
        return base
    found = yield from versions(core, names)
    return None if found is None else scoped_key(base, tenant, found)


def in_scope(
    core: Core, base: str, tenant: str | None, names: Sequence[str], then: Callable[[str], Flow[R]], otherwise: R
) -> Flow[R]:
    """Run ``then(key)`` with ``base``'s key in its scope; ``otherwise`` if it is unknown."""
    key = yield from scope_key(core, base, tenant, names)
    if key is None:
        return otherwise
    return (yield from then(key))


def bump(core: Core, names: Sequence[str], wait: float | None) -> Flow[WriteResult]:
    """Invalidate every entry scoped by ``names`` (tags, tenants) at once: increment their
    version counters and tell every process to drop its cached versions."""
    if not names:
        return WriteResult(None, 0, None)
    if not core.has_remote:
        for name in names:
            core.local_versions[name] = core.local_versions.get(name, 0) + 1
    return (yield from _write.write(core, names, None, 0.0, None, None, wait, incr=True))


def clear(core: Core, wait: float | None) -> Flow[WriteResult]:
    """Drop every entry of the namespace in every process, in O(1): a new generation, so
    every key changes; the old entries are never read again and expire by their TTL."""
    if not core.has_remote:
        core.apply_generation(str(core.keyspace.generation_number() + 1))
        return WriteResult(None, None, None)
    ack_key = core.ack_key(wait)
    current = max(core.keyspace.generation_number(), 0)
    op = _remote.clear(core.seq_key, core.gen_key, core.channel, core.node_id, current, ack_key)
    reply = core.settle(op, (yield op) if core.allow() else SKIPPED)
    if reply is FAILED:
        return WriteResult(None, None, None)
    seq, receivers, generation = reply
    core.apply_generation(generation)
    return (yield from _write.acknowledged(core, seq, receivers, ack_key, wait))

"""The read and write algorithms, written once as sans-I/O generators.

Each flow is a generator that yields what it needs done — a Redis round trip (a
:class:`~tiercache._remote.RedisOp`), a call of the user's function (:data:`CALL`), or a wait
for another caller's in-flight load (:class:`Wait`) — and receives the outcome, or has the
failure thrown in. ``_sync.drive`` and ``_async.drive`` are the two small loops that run these
generators with redis-py's sync client and threads, or ``redis.asyncio`` and tasks; nothing
about the algorithm lives in them. The L1 hit needs no flow at all: the wrappers answer it
before a generator is ever made.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Generator, Sequence
from typing import Any

from . import _remote
from ._codec import Codec
from ._flight import Flight, FlightTable
from ._local import LocalCache
from ._metrics import CacheStats, Counters, RateLimitedLog
from ._remote import FAILED, Breaker, RedisOp, RemoteFailure
from ._types import MISSING
from .errors import BackendError, CodecError, ValueTooLargeError

__all__ = ["CALL", "Core", "Flow", "Wait"]


class _Call:
    __slots__ = ()

    def __repr__(self) -> str:
        return "CALL"


#: Yielded by a flow to have the driver call the user's function (and send back its result).
CALL: Any = _Call()


class Wait:
    """Yielded by a flow to have the driver block (or await) until ``flight`` ends."""

    __slots__ = ("flight",)

    def __init__(self, flight: Flight) -> None:
        self.flight = flight


Flow = Generator[Any, Any, Any]


class Core:
    """Configuration and state of one TieredCache, and the algorithms that use them.

    Pure: no sockets, no threads started, no clock read but the injected one.
    """

    def __init__(
        self,
        *,
        namespace: str,
        ttl: float,
        l1_ttl: float,
        local: LocalCache,
        codec: Codec,
        has_remote: bool,
        strict: bool,
        clock: Callable[[], float],
    ) -> None:
        self.namespace = namespace
        self.ttl = ttl
        self.l1_ttl = l1_ttl
        self.local = local
        self.codec = codec
        self.has_remote = has_remote
        self.strict = strict
        self.clock = clock
        self.node_id = secrets.token_hex(8)
        self.channel = f"tc:{namespace}:inval"
        self.seq_key = f"tc:{namespace}:seq"
        self.counters = Counters()
        self.flights = FlightTable()
        self.breaker = Breaker(threshold=5, cooldown=1.0, clock=clock)
        self.log = RateLimitedLog(clock=clock)

    # -- state changes that do no I/O -------------------------------------------------------

    def evict(self, keys: Sequence[str]) -> None:
        """Drop ``keys`` from L1 and mark their in-flight loads dirty (invariant 2)."""
        self.flights.mark_dirty(keys)
        self.local.pop_many(keys)

    def stats(self) -> CacheStats:
        c = self.counters
        return CacheStats(
            l1_hits=c.l1_hits,
            l2_hits=c.l2_hits,
            misses=c.misses,
            loads=c.loads,
            load_errors=c.load_errors,
            backend_errors=c.backend_errors,
            codec_errors=c.codec_errors,
            not_cached=c.not_cached,
            l1_size=len(self.local),
            l1_bytes=self.local.bytes,
            in_flight=len(self.flights),
        )

    # -- flows ------------------------------------------------------------------------------

    def read_through(self, key: str, ttl: float | None, l1_ttl: float | None, load: bool) -> Flow:
        """L2, else the function (when ``load``), single-flighted per key. L1 was checked already.

        Returns the value, or MISSING when ``load`` is false and neither tier has it.
        """
        while True:
            flight, leader = self.flights.lead_or_join(key)
            if leader:
                break
            yield Wait(flight)
            if flight.abandoned:  # the leader was cancelled: try again, maybe as the leader
                continue
            if flight.error is not None:
                raise flight.error
            return flight.value
        try:
            value = self.local.get(key)  # filled between our L1 miss and taking the lead?
            if value is MISSING:
                value = yield from self._load(flight, key, ttl, l1_ttl, load)
        except Exception as exc:
            self.flights.release(flight)
            flight.fail(exc)
            raise
        except BaseException:
            self.flights.release(flight)
            flight.abandon()
            raise
        self.flights.release(flight)
        flight.finish(value)
        return value

    def _load(self, flight: Flight, key: str, ttl: float | None, l1_ttl: float | None, load: bool) -> Flow:
        found = yield from self._remote(_remote.fetch(key))
        if found is not None and found is not FAILED:
            data, pttl = found
            try:
                value = self.codec.decode(key, data)
            except CodecError as exc:
                self.counters.codec_errors += 1
                self.log.emit("codec", "tiercache: ignoring unreadable value in Redis: %s", exc)
            else:
                self.counters.l2_hits += 1
                if not flight.dirty:
                    remaining = pttl / 1000.0 if pttl > 0 else float("inf")
                    self.local.put(key, value, min(self._l1_ttl(l1_ttl), remaining), len(data))
                return value
        self.counters.misses += 1
        if not load:
            return MISSING
        self.counters.loads += 1
        try:
            value = yield CALL
        except Exception:
            self.counters.load_errors += 1
            raise
        data = self._encode_or_none(key, value)
        if data is None:
            return value
        ttl_s = self.ttl if ttl is None else ttl
        yield from self._remote(_remote.store(key, data, _ms(ttl_s)))
        if not flight.dirty:  # invariant 2: a load overtaken by an invalidation stays out of L1
            self.local.put(key, value, min(self._l1_ttl(l1_ttl), ttl_s), len(data))
        return value

    def refresh(self, key: str, ttl: float | None, l1_ttl: float | None) -> Flow:
        """Call the function now and write its result to both tiers, telling every node."""
        self.counters.loads += 1
        try:
            value = yield CALL
        except Exception:
            self.counters.load_errors += 1
            raise
        data = self._encode_or_none(key, value)
        if data is None:
            yield from self.delete([key])
            return value
        yield from self._write([key], [data], self.ttl if ttl is None else ttl, [value], l1_ttl)
        return value

    def set(self, key: str, value: Any, ttl: float | None, l1_ttl: float | None) -> Flow:
        """Write ``value`` to Redis, broadcast the invalidation, then keep it in local L1."""
        data = self.codec.encode(key, value)  # an explicit set of an unencodable value raises
        yield from self._write([key], [data], self.ttl if ttl is None else ttl, [value], l1_ttl)

    def delete(self, keys: Sequence[str]) -> Flow:
        """Delete ``keys`` from Redis, broadcast the invalidation, evict them here."""
        yield from self._write(keys, None, 0.0, None, None)

    def _write(
        self,
        keys: Sequence[str],
        datas: Sequence[bytes] | None,
        ttl: float,
        values: Sequence[Any] | None,
        l1_ttl: float | None,
    ) -> Flow:
        op = _remote.write(self.seq_key, self.channel, self.node_id, keys, datas, _ms(ttl))
        result = yield from self._remote(op)
        # Redis first, then L1: a local load that starts after this line reads the new state,
        # and one already in flight is marked dirty by evict().
        self.evict(keys)
        if values is not None and datas is not None and result is not FAILED:
            l1 = min(self._l1_ttl(l1_ttl), ttl)
            for key, value, data in zip(keys, values, datas, strict=True):
                self.local.put(key, value, l1, len(data))

    # -- helpers ----------------------------------------------------------------------------

    def _remote(self, op: RedisOp) -> Flow:
        """One Redis round trip with fail-open: the reply, or FAILED (strict: BackendError)."""
        if not self.has_remote:
            return FAILED
        if not self.breaker.allow():
            if self.strict:
                raise BackendError("Redis circuit breaker is open after repeated failures")
            return FAILED
        try:
            reply = yield op
        except RemoteFailure as failure:
            self.breaker.failure()
            self.counters.backend_errors += 1
            cause = failure.__cause__
            self.log.emit("backend", "tiercache: Redis %s failed, answering without it: %r", op.args[0], cause)
            if self.strict:
                raise BackendError(f"Redis {op.args[0]} failed: {cause!r}") from cause
            return FAILED
        self.breaker.success()
        return reply

    def _encode_or_none(self, key: str, value: Any) -> bytes | None:
        try:
            return self.codec.encode(key, value)
        except CodecError as exc:
            self.counters.not_cached += 1
            kind = "too-large" if isinstance(exc, ValueTooLargeError) else "unencodable"
            self.log.emit(kind, "tiercache: result returned but not cached: %s", exc)
            return None

    def _l1_ttl(self, l1_ttl: float | None) -> float:
        return self.l1_ttl if l1_ttl is None else l1_ttl


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))

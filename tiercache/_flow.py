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

import itertools
import secrets
import threading
from collections.abc import Callable, Generator, Sequence
from typing import Any

from . import _remote
from ._codec import Codec
from ._coherence import Bus, WriteResult
from ._flight import Flight, FlightTable
from ._local import LocalCache
from ._metrics import CacheStats, Counters, RateLimitedLog
from ._remote import FAILED, LEASE_PREFIX, Breaker, PoolBusy, RedisOp, RemoteFailure
from ._types import MISSING
from .errors import BackendError, CodecError, ValueTooLargeError

__all__ = ["CALL", "Core", "Flow", "Wait"]


class _Call:
    __slots__ = ()

    def __repr__(self) -> str:
        return "CALL"


#: Yielded by a flow to have the driver call the user's function (and send back its result).
CALL: Any = _Call()

_SKIPPED: Any = object()  # a Redis step not sent (no Redis, or the breaker is open)


class Wait:
    """Yielded by a flow to have the driver block (or await) until another caller's load
    of the same key (``flight``) ends."""

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
        coherent: bool,
        strict: bool,
        clock: Callable[[], float],
        block_slice: float = 0.1,
        db: int = 0,
    ) -> None:
        self.namespace = namespace
        self.ttl = ttl
        self.l1_ttl = l1_ttl
        self.local = local
        self.codec = codec
        self.has_remote = has_remote
        self.strict = strict
        self.clock = clock
        self.block_slice = block_slice  # longest a blocking command may wait (< socket timeout)
        #: How long a miss's lease lives: a load slower than this still answers its callers,
        #: but its result is not stored in Redis.
        self.lease_ms = 10_000
        self.node_id = secrets.token_hex(8)
        self._marker_base = self.node_id.encode()
        self._markers = itertools.count()
        # Pub/sub ignores the database number, so the channel names it: caches of one namespace
        # in different databases must not hear (or count, or acknowledge) each other.
        self.channel = f"tc:{namespace}:inval:{db}"
        self.seq_key = f"tc:{namespace}:seq"
        self.counters = Counters()
        self.flights = FlightTable(local)
        self.breaker = Breaker(threshold=5, cooldown=1.0, clock=clock)
        self._last_failure: BaseException | None = None  # the cause of "breaker open" errors
        #: Applies invalidations that have arrived, from a caller's thread (set by the cache
        #: when it runs a subscriber; see _sync.Subscriber.poll).
        self.poll: Callable[[], None] = _nothing
        self.log = RateLimitedLog(clock=clock)
        #: The invalidation bus, when other processes can share this namespace. Until its
        #: subscriber confirms a subscription, L1 takes no entries (invariant 4).
        self.bus = Bus(self.channel, self.node_id, self.flights, self.log) if has_remote and coherent else None
        if self.bus is not None:
            self.flights.flush(accepting=False)

    def reset_after_fork(self) -> None:
        """In a forked child: fresh locks and tables (the parent's threads are gone), L1 off."""
        self.local.reset_lock()
        self.flights.reset()
        self.codec.reset_after_fork()
        self.node_id = secrets.token_hex(8)  # the parent's id would make us ignore its messages
        self._marker_base = self.node_id.encode()  # and its lease markers would be ours
        if self.bus is not None:
            self.bus.node_id = self.node_id
            self.bus.connected = threading.Event()
            self.bus.last_seq = None
            self.flights.flush(accepting=False)

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
            bus_connected=None if self.bus is None else self.bus.connected.is_set(),
            bus_messages=0 if self.bus is None else self.bus.messages,
            bus_flushes=0 if self.bus is None else self.bus.flushes,
            bus_gaps=0 if self.bus is None else self.bus.gaps,
        )

    # -- flows ------------------------------------------------------------------------------

    def get(self, key: str) -> Flow:
        """L1, else L2; MISSING when neither has ``key``. (Decorated functions inline the L1 step.)"""
        value = self.local.get(key)
        if value is not MISSING:
            self.counters.l1_hits += 1
            return value
        return (yield from self.read_through(key, None, None, False))

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
            if load and flight.value is MISSING and flight.error is None:
                continue  # we joined a cache.get() (which may not load) that found nothing
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
        marker = LEASE_PREFIX + b"%s:%d" % (self._marker_base, next(self._markers)) if load else b""
        op = _remote.fetch(key, marker, self.lease_ms) if load else _remote.peek(key)
        sent_at = self.clock()
        found = self._settle(op, (yield op) if self._allow() else _SKIPPED)
        unreadable: bytes | None = None
        if isinstance(found, tuple):
            data, pttl = found
            try:
                value = self.codec.decode(key, data)
            except CodecError as exc:
                self.counters.codec_errors += 1
                self.log.emit("codec", "tiercache: ignoring unreadable value in Redis: %s", exc)
                unreadable = data
            else:
                self.counters.l2_hits += 1
                # An L1 copy never outlives its L2 copy: the TTL left in Redis came in the same
                # reply, measured by Redis after we sent the request, so an expiry fixed from
                # the moment we sent it (not from now, after the reply and decoding) errs early.
                # PTTL -1: no expiry; -2: the key expired between the two pipelined commands.
                remaining = pttl / 1000.0 if pttl >= 0 else float("inf") if pttl == -1 else 0.0
                self.flights.fill(flight, value, sent_at + min(self._l1_ttl(l1_ttl), remaining), len(data))
                return value
        self.counters.misses += 1
        if not load:
            return MISSING
        self.counters.loads += 1
        try:
            value = yield CALL
        except Exception:
            self.counters.load_errors += 1
            if found is True:  # hand the key back now rather than after the lease TTL
                yield from self._quietly(_remote.release(key, marker))
            raise
        data = self._encode_or_none(key, value)
        if data is None:
            if found is True:
                yield from self._quietly(_remote.release(key, marker))
            return value
        ttl_s = self.ttl if ttl is None else ttl
        sent_at = self.clock()
        if found is True:
            # invariant 3: lands only if no write or invalidation of the key came since the
            # miss (they replace our lease marker). The lease, not our local dirty mark,
            # decides: a local flush on resubscribe says nothing about Redis.
            op = _remote.fill(key, marker, data, _ms(ttl_s))
            if self._settle(op, (yield op) if self._allow() else _SKIPPED) is False:
                return value  # refused: the key was written since our miss, so this is stale
        elif unreadable is not None:
            # Replace the unreadable bytes, unless someone wrote the key meanwhile.
            op = _remote.replace(key, unreadable, data, _ms(ttl_s))
            self._settle(op, (yield op) if self._allow() else _SKIPPED)
        # invariant 2: fill() keeps a load overtaken by an invalidation out of L1. The Redis
        # copy's TTL started after sent_at, so L1's, counted from sent_at, ends no later.
        self.flights.fill(flight, value, sent_at + min(self._l1_ttl(l1_ttl), ttl_s), len(data))
        return value

    def refresh(self, key: str, ttl: float | None, l1_ttl: float | None) -> Flow:
        """Call the function now and write its result to both tiers, telling every node.

        The old value keeps being served meanwhile. Invariant 3: a write or invalidation of
        the key while the function runs wins: the refresh's result is returned to its caller
        but stored nowhere (Redis refuses it, and the local watch keeps it out of L1)."""
        token = LEASE_PREFIX + b"%s:%d" % (self._marker_base, next(self._markers))
        watches = self.flights.watch([key])
        try:
            op = _remote.begin_refresh(key, token, self.lease_ms)
            begun = self._settle(op, (yield op) if self._allow() else _SKIPPED)
            self.counters.loads += 1
            try:
                value = yield CALL
            except Exception:
                self.counters.load_errors += 1
                raise
            data = self._encode_or_none(key, value)
            ttl_s = self.ttl if ttl is None else ttl
            sent_at = self.clock()
            if data is None or (begun is FAILED and self.has_remote):
                self.flights.abort_write(watches)
                return value
            if self.has_remote:
                op = _remote.finish_refresh(self.seq_key, self.channel, self.node_id, key, token, data, _ms(ttl_s))
                reply = self._settle(op, (yield op) if self._allow() else _SKIPPED)
                if reply is FAILED or reply is False:
                    self.flights.abort_write(watches)
                    return value
        except BaseException:
            self.flights.abort_write(watches)
            raise
        self.flights.commit_write(watches, [value], sent_at + min(self._l1_ttl(l1_ttl), ttl_s), [len(data)])
        return value

    def set(self, key: str, value: Any, ttl: float | None, l1_ttl: float | None, wait: float | None) -> Flow:
        """Write ``value`` to Redis, broadcast the invalidation, then keep it in local L1."""
        data = self.codec.encode(key, value)  # an explicit set of an unencodable value raises
        return (yield from self._write([key], [data], self.ttl if ttl is None else ttl, [value], l1_ttl, wait))

    def delete(self, keys: Sequence[str], wait: float | None) -> Flow:
        """Delete ``keys`` from Redis, broadcast the invalidation, evict them here."""
        if not keys:
            return WriteResult(None, 0, None)
        return (yield from self._write(keys, None, 0.0, None, None, wait))

    def _write(
        self,
        keys: Sequence[str],
        datas: Sequence[bytes] | None,
        ttl: float,
        values: Sequence[Any] | None,
        l1_ttl: float | None,
        wait: float | None,
    ) -> Flow:
        """Redis first (one script: write, sequence number, publish), then this process's L1.

        ``wait`` (seconds): also wait until every subscriber that received the message has
        acknowledged applying it, or until that many seconds passed.
        """
        ack_key = f"tc:{self.namespace}:ack:{secrets.token_hex(8)}" if wait is not None else ""
        watches = self.flights.watch(keys)
        sent_at = self.clock()
        op = _remote.write(self.seq_key, self.channel, self.node_id, keys, datas, _ms(ttl), ack_key)
        try:
            reply = self._settle(op, (yield op) if self._allow() else _SKIPPED)
        except BaseException:
            self.flights.abort_write(watches)
            raise
        if reply is FAILED and self.has_remote:
            # Not in Redis, so not in L1 either; other nodes keep what they had until their TTL
            # or their next message (fail open cannot tell them).
            self.flights.abort_write(watches)
            return WriteResult(None, None, None)
        sizes = [len(d) for d in datas] if datas is not None else []
        # as in _load: counted from before the request, so never past the Redis copy
        self.flights.commit_write(watches, values, sent_at + min(self._l1_ttl(l1_ttl), ttl), sizes)
        if reply is FAILED:  # L1-only cache
            return WriteResult(None, None, None)
        seq, receivers = reply
        if wait is None:
            return WriteResult(seq, receivers)
        acknowledged = yield from self._await_acks(ack_key, receivers, wait)
        return WriteResult(seq, receivers, acknowledged)

    def _await_acks(self, ack_key: str, expected: int, timeout: float) -> Flow:
        """Collect up to ``expected`` acknowledgements from the write's list within ``timeout``.

        They wait in Redis, so none is lost while this process's own subscriber reconnects.
        BLPOP blocks in short slices, well inside the socket timeout of the connection."""
        acked = 0
        deadline = self.clock() + timeout
        while acked < expected:
            left = deadline - self.clock()
            if left <= 0:
                break
            op = _remote.await_ack(ack_key, min(left, self.block_slice))
            got = self._settle(op, (yield op) if self._allow() else _SKIPPED)
            if got is FAILED:
                break
            acked += got
            if got and acked < expected:
                op = _remote.take_acks(ack_key, expected - acked)
                more = self._settle(op, (yield op) if self._allow() else _SKIPPED)
                acked += 0 if more is FAILED else more
        return min(acked, expected)

    # -- helpers ----------------------------------------------------------------------------

    # Every Redis step of a flow is ``reply = self._settle(op, (yield op) if self._allow() else
    # _SKIPPED)``: one generator frame, not a helper generator per step (this is the L2-hit path).
    # The drivers send a RemoteFailure back as the reply instead of throwing it in.

    def _allow(self, quiet: bool = False) -> bool:
        """Whether to send a Redis command now (no Redis configured, or the breaker is open: no)."""
        if not self.has_remote:
            return False
        if self.breaker.allow():
            return True
        if self.strict and not quiet:
            raise BackendError(
                f"Redis circuit breaker is open after repeated failures, the last: {self._last_failure!r}"
            ) from self._last_failure
        return False

    def _settle(self, op: RedisOp, reply: Any, quiet: bool = False) -> Any:
        """The reply of ``op``, or FAILED with fail-open (strict: BackendError, unless ``quiet``:
        clean-up steps never replace the error being raised)."""
        if reply is _SKIPPED:
            return FAILED
        if isinstance(reply, RemoteFailure):
            if type(reply) is not PoolBusy:
                self.breaker.failure()
            self.counters.backend_errors += 1
            cause = reply.__cause__
            self._last_failure = cause
            what = f"{type(cause).__name__}: {cause}"
            self.log.emit("backend", "tiercache: Redis %s failed, answering without it: %s", op.args[0], what)
            if self.strict and not quiet:
                raise BackendError(f"Redis {op.args[0]} failed: {what}") from cause
            return FAILED
        self.breaker.success()
        return reply

    def _quietly(self, op: RedisOp) -> Flow:
        """A clean-up step: failures are only counted and logged, even in strict mode."""
        return self._settle(op, (yield op) if self._allow(quiet=True) else _SKIPPED, quiet=True)

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


def _nothing() -> None:
    pass


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))

"""Core: one cache's configuration and state, and the step helpers every flow shares.

The flows themselves are module-level generator functions over a ``Core``: ``_read`` (one
key), ``_batchread`` (many keys), ``_write`` (writes, refreshes, acknowledgements) and
``_scope`` (tags, tenants, generations). Pure: no sockets, no threads started, no clock read
but the injected one.
"""

from __future__ import annotations

import contextvars
import itertools
import secrets
import threading
from collections.abc import Callable, Collection, Sequence
from typing import Any, Literal

from . import _remote
from ._codec import Codec
from ._coherence import Bus
from ._flight import Flight, FlightTable
from ._keys import KeySpace
from ._local import LocalCache
from ._metrics import BUS_COUNTER_FIELDS, CacheStats, Counters, RateLimitedLog
from ._policy import Policy
from ._remote import LEASE_PREFIX, Breaker, PoolBusy, RedisOp, RemoteFailure, UnreadableReply
from ._steps import CallWith, Flow, Reply, Wait
from ._types import FAILED, MISSING, SKIPPED, Sentinel
from .errors import BackendError, CodecError, ValueTooLargeError

__all__ = ["LOADING", "Core", "ms", "pttl_seconds"]

#: The keys this context is computing (the function is running for them): a call of one of
#: them from inside its own loader (directly, from a task or thread it started in a copy of
#: this context, or a refresh's worker) must not join or wait for that load, which waits for it.
LOADING: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("tiercache_loading", default=frozenset())


class Core:
    """Configuration and state of one TieredCache: L1, codec, counters, breaker, in-flight
    table, bus, node id, the versions it knows; and the fail-open policy of every Redis step.

    Every Redis step of a flow is one line, in the flow's own frame (no helper generator per
    step: this is the L2-hit path); the drivers send a RemoteFailure back as the reply::

        reply = core.settle(op, (yield op) if core.allow() else SKIPPED)
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
        lease_ttl: float = 10.0,
        breaker_threshold: int = 5,
        breaker_cooldown: float = 1.0,
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
        #: but its result is not stored in Redis; and the longest another process waits for
        #: this one's load (one whose holder died) before loading itself.
        self.lease_ms = ms(lease_ttl)
        #: What ``cache.get`` and ``cache.set`` use: the cache's TTLs, no extra policy.
        self.default_policy = Policy("cache.get", ttl, l1_ttl)
        self.node_id = secrets.token_hex(8)
        self._marker_base = self.node_id.encode()
        self._markers = itertools.count()
        #: Every Redis name of the namespace, at its current generation (see ``_scope.clear``).
        self.keyspace = KeySpace(namespace, db)
        # The names every write uses, at hand (built by the key space).
        self.channel = self.keyspace.channel
        self.seq_key = self.keyspace.seq_key
        self.gen_key = self.keyspace.gen_key
        self.counters = Counters()
        self.flights = FlightTable(local)
        #: Keys being refreshed ahead of expiry in this process (one refresh per key).
        self.refreshing: set[str] = set()
        self.refreshing_lock = threading.Lock()
        #: Tag and tenant versions of an L1-only cache (no Redis to keep them in).
        self.local_versions: dict[str, int] = {}
        #: The last versions read from Redis, kept through L1 flushes: a scope's best guess
        #: while Redis cannot be read (``_scope.known_versions``).
        self.last_versions: dict[str, int] = {}
        self.breaker = Breaker(threshold=breaker_threshold, cooldown=breaker_cooldown, clock=clock)
        self._last_failure: BaseException | None = None  # the cause of "breaker open" errors
        #: Applies invalidations that have arrived, from a caller's thread (set by the cache
        #: when it runs a subscriber; see the Subscriber's ``poll``).
        self.poll: Callable[[], None] = _nothing
        self.log = RateLimitedLog(clock=clock)
        #: The invalidation bus, when other processes can share this namespace. Until its
        #: subscriber confirms a subscription, L1 takes no entries (invariant 4).
        self.bus = (
            Bus(self.keyspace, self.node_id, self.flights, self.log, self.apply_generation)
            if has_remote and coherent
            else None
        )
        if self.bus is not None:
            self.flights.flush(accepting=False)

    def reset_after_fork(self) -> None:
        """In a forked child: fresh locks and tables (the parent's threads are gone), L1 off."""
        self.local.reset_lock()
        self.flights.reset()
        self.codec.reset_after_fork()
        self.refreshing = set()
        self.refreshing_lock = threading.Lock()
        self.node_id = secrets.token_hex(8)  # the parent's id would make us ignore its messages
        self._marker_base = self.node_id.encode()  # and its lease markers would be ours
        if self.bus is not None:
            self.bus.node_id = self.node_id
            self.bus.connected = threading.Event()
            self.bus.last_seq = None
            self.flights.flush(accepting=False)

    def stats(self) -> CacheStats:
        bus = self.bus
        return CacheStats(
            **self.counters.snapshot(),
            **{name: 0 if bus is None else getattr(bus, name.removeprefix("bus_")) for name in BUS_COUNTER_FIELDS},
            l1_size=len(self.local),
            l1_bytes=self.local.bytes,
            in_flight=len(self.flights),
            bus_connected=None if bus is None else bus.connected.is_set(),
        )

    # -- generations (state the bus changes) ---------------------------------------------------

    def apply_generation(self, generation: str) -> None:
        """Adopt the namespace's generation (from the bus, our own ``clear``, or read when
        subscribing), if it is later than ours: new keys from now on, and L1 emptied (loads in
        flight dirtied) since it holds the old ones."""
        if self.keyspace.advance(generation):
            self.flights.flush(accepting=self.local.accepting, keep_stale=False)

    # -- the fail-open policy of a Redis step ------------------------------------------------

    def allow(self, quiet: bool = False) -> bool:
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

    def settle(self, op: RedisOp, reply: Reply, quiet: bool = False) -> Any:
        """The reply of ``op``, or FAILED with fail-open (strict: BackendError, unless ``quiet``:
        clean-up steps never replace the error being raised)."""
        if reply is SKIPPED:
            self.local.outage = self.has_remote  # the breaker is open
            return FAILED
        if isinstance(reply, RemoteFailure):
            if type(reply) is not PoolBusy and type(reply) is not UnreadableReply:
                self.breaker.failure()
                self.local.outage = True
            self.counters.backend_errors += 1
            cause = reply.__cause__
            self._last_failure = cause
            what = f"{type(cause).__name__}: {cause}"
            self.log.emit("backend", "tiercache: Redis %s failed, answering without it: %s", op.args[0], what)
            if self.strict and not quiet:
                raise BackendError(f"Redis {op.args[0]} failed: {what}") from cause
            return FAILED
        self.breaker.success()
        self.local.outage = False
        return reply

    def quietly(self, op: RedisOp) -> Flow[Any]:
        """A clean-up step: failures are only counted and logged, even in strict mode."""
        return self.settle(op, (yield op) if self.allow(quiet=True) else SKIPPED, quiet=True)

    # -- leases ---------------------------------------------------------------------------

    def mint_marker(self) -> bytes:
        """A lease marker (or refresh token) of this process, unique within it."""
        return LEASE_PREFIX + b"%s:%d" % (self._marker_base, next(self._markers))

    def release(self, keys: Sequence[str], marker: bytes) -> Flow[Any]:
        """Give the leases ``marker`` holds on ``keys`` back (announced to waiters), quietly."""
        return (yield from self.quietly(_remote.release_many(keys, marker, self.channel, self.node_id)))

    def await_leader(self, flight: Flight, bounded: bool = True) -> Flow[bool]:
        """Wait for another caller's load of ``flight.key`` (single-key or batch), at most
        ``lease_ttl``, like a wait for another process's lease: a leader slower than that
        stores nothing in Redis anyway, and one that waits for this very caller (its function
        calls its own key through a thread that does not carry its context) would never end.
        Past the bound a load still running is taken off the table, so the first waiter to
        retry leads a new one and the others join it; a caller's waits are bounded only once
        (``bounded``), so that new load is waited for to its end: one extra call at most, not
        one per waiter or per ``lease_ttl``. False when the caller may not wait at all (see
        ``_sync.wait``)."""
        if flight.done:
            return True
        if (yield Wait(flight, self.lease_ms / 1000.0 if bounded else None)) is False:
            return False
        if not flight.done:
            self.flights.release(flight)
        return True

    def ack_key(self, wait: float | None) -> str:
        """A fresh acknowledgement list for a write that waits (``wait`` not None), else ""."""
        return self.keyspace.ack_key() if wait is not None else ""

    # -- values ---------------------------------------------------------------------------

    def decode(self, key: str, data: bytes) -> Any:
        """The value ``data`` holds, or MISSING when it is unreadable (counted, logged)."""
        try:
            return self.codec.decode(key, data)
        except CodecError as exc:
            self.counters.codec_errors += 1
            self.log.emit("codec", "tiercache: ignoring unreadable value in Redis: %s", exc)
            return MISSING

    def encode_or_none(self, key: str, value: object) -> bytes | None:
        """``value``'s bytes, or None when it cannot be cached (counted, logged)."""
        try:
            return self.codec.encode(key, value)
        except CodecError as exc:
            self.counters.not_cached += 1
            kind = "too-large" if isinstance(exc, ValueTooLargeError) else "unencodable"
            self.log.emit(kind, "tiercache: result returned but not cached: %s", exc)
            return None

    def call(self, policy: Policy, step: Literal[Sentinel.CALL] | CallWith, loading: Collection[str] = ()) -> Flow[Any]:
        """The function's result for ``step`` (CALL, or a batch's CallWith): counted and timed
        (XFetch's delta). ``loading``: the keys this context computes meanwhile (see LOADING)."""
        self.counters.loads += 1
        started = self.clock()
        token = LOADING.set(LOADING.get().union(loading)) if loading else None
        try:
            value = yield step
        except Exception:
            self.counters.load_errors += 1
            raise
        finally:
            if token is not None:
                _unset(token)
        policy.record_load_time(self.clock() - started)
        return value

    def l1_ttl_or(self, l1_ttl: float | None) -> float:
        return self.l1_ttl if l1_ttl is None else l1_ttl


def ms(seconds: float) -> int:
    """Seconds as the whole milliseconds Redis takes (at least 1)."""
    return max(1, int(seconds * 1000))


def pttl_seconds(pttl: int) -> float:
    """A PTTL reply in seconds: -1 (no expiry) is forever; -2 (the key expired between the
    pipelined commands) is none left."""
    return pttl / 1000.0 if pttl >= 0 else float("inf") if pttl == -1 else 0.0


def _nothing() -> None:
    pass


def _unset(token: contextvars.Token[frozenset[str]]) -> None:
    try:
        LOADING.reset(token)
    except ValueError:  # a flow closed (collected) in another context: nothing of ours there
        pass

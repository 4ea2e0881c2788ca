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

import contextvars
import itertools
import math
import secrets
import threading
from collections.abc import Callable, Generator, Sequence
from typing import Any

from . import _remote
from ._codec import Codec
from ._coherence import Bus, WriteResult
from ._flight import Flight, FlightTable
from ._keys import KeySpace, _generation_number, scoped_key
from ._local import LocalCache
from ._metrics import CacheStats, Counters, RateLimitedLog
from ._remote import FAILED, LEASE_PREFIX, Breaker, PoolBusy, RedisOp, RemoteFailure, UnreadableReply
from ._types import MISSING, RNG
from .errors import BackendError, CodecError, LoadTimeoutError, ValueTooLargeError

__all__ = ["CALL", "CachedError", "CallWith", "Core", "Flow", "Policy", "Spawn", "Wait"]


class _Call:
    __slots__ = ()

    def __repr__(self) -> str:
        return "CALL"


#: Yielded by a flow to have the driver call the user's function (and send back its result).
CALL: Any = _Call()

_SKIPPED: Any = object()  # a Redis step not sent (no Redis, or the breaker is open)


class CallWith:
    """Yielded by a batch flow to have the driver call the function with ``arg`` (the items
    that missed both tiers) and send back its result."""

    __slots__ = ("arg",)

    def __init__(self, arg: Any) -> None:
        self.arg = arg


class Wait:
    """Yielded by a flow to have the driver block (or await) until ``flight`` ends, or until
    ``timeout`` seconds passed (None: no limit). The flow then looks at ``flight.done``."""

    __slots__ = ("flight", "timeout")

    def __init__(self, flight: Flight, timeout: float | None = None) -> None:
        self.flight = flight
        self.timeout = timeout


class Spawn:
    """Yielded by a flow to have the driver run another flow in the background (a worker
    thread, or a task on the running loop), with the same function to call, and go on at
    once. The driver sets ``flight.cancel`` when it can stop the background flow."""

    __slots__ = ("flight", "flow")

    def __init__(self, flow: Flow, flight: Flight) -> None:
        self.flow = flow
        self.flight = flight


class CachedError:
    """An exception kept in L1 by ``cache_errors`` (negative caching): raised, not returned."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class Policy:
    """How calls of one decorated function (or ``cache.get``) use the tiers: the decorator's
    arguments with the cache's defaults filled in, plus what is learnt while running (the
    function's typical load time, for XFetch). Validated by the caller."""

    __slots__ = (
        "cache_errors",
        "detached",
        "early",
        "error_ttl",
        "hard_timeout",
        "inspect",
        "l1_ttl",
        "load_time",
        "name",
        "refresh_after",
        "refresh_beta",
        "soft_timeout",
        "stale_ttl",
        "ttl",
        "ttl_jitter",
    )

    def __init__(
        self,
        name: str,
        ttl: float,
        l1_ttl: float,
        *,
        stale_ttl: float = 0.0,
        soft_timeout: float | None = None,
        hard_timeout: float | None = None,
        refresh_beta: float = 0.0,
        refresh_after: float | None = None,
        ttl_jitter: float = 0.0,
        cache_errors: tuple[type[BaseException], ...] = (),
        error_ttl: float = 0.0,
    ) -> None:
        self.name = name
        self.ttl = ttl
        self.l1_ttl = l1_ttl
        self.stale_ttl = stale_ttl
        self.soft_timeout = soft_timeout
        self.hard_timeout = hard_timeout
        self.refresh_beta = refresh_beta
        self.refresh_after = refresh_after
        self.ttl_jitter = ttl_jitter
        self.cache_errors = cache_errors
        self.error_ttl = error_ttl
        #: Seconds the function took, a moving average (XFetch's delta).
        self.load_time = 0.0
        #: Refresh ahead of expiry: L1 entries turn "due" before they expire.
        self.early = refresh_beta > 0 or refresh_after is not None
        #: Loads run in the background, callers wait with timeouts.
        self.detached = soft_timeout is not None or hard_timeout is not None
        #: A call past an entry's ``fresh_until`` must look at the entry (refresh-ahead, stale
        #: copies, cached errors) before loading.
        self.inspect = self.early or stale_ttl > 0 or bool(cache_errors)

    def record_load_time(self, seconds: float) -> None:
        self.load_time = seconds if self.load_time == 0.0 else 0.8 * self.load_time + 0.2 * seconds

    def l2_ttl(self) -> float:
        """The TTL of one fill in Redis: ``ttl``, shortened by up to ``ttl_jitter`` of it at
        random so keys filled together do not expire together."""
        if self.ttl_jitter:
            return self.ttl * (1.0 - self.ttl_jitter * RNG.random())
        return self.ttl

    def fresh_until(self, expires: float) -> float | None:
        """When an entry that ends in Redis at ``expires`` becomes due for a refresh ahead of
        time: XFetch (Vattani et al., VLDB 2015) draws ``delta * beta * -ln(U)`` before the
        end, once per fill and process rather than per read (so the hit path stays a dict
        lookup and one comparison), and ``refresh_after`` is a fixed soft TTL."""
        if not self.early:
            return None
        points = []
        if self.refresh_after is not None:
            points.append(expires - self.ttl + self.refresh_after)
        if self.refresh_beta > 0:
            u = 1.0 - RNG.random()  # in (0, 1]
            points.append(expires - self.load_time * self.refresh_beta * -math.log(u))
        return min(points)


_RETRY: Any = object()
_SOLO: Any = object()  # the caller must not wait for this flight: it would wait for itself

#: The keys this context is computing (the function is running for them): a call of one of
#: them from inside its own loader (directly, from a task or thread it started in a copy of
#: this context, or a refresh's worker) must not join or wait for that load, which waits for it.
_LOADING: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("tiercache_loading", default=frozenset())


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
        self.lease_ms = _ms(lease_ttl)
        #: What ``cache.get`` and ``cache.set`` use: the cache's TTLs, no extra policy.
        self.default_policy = Policy("cache.get", ttl, l1_ttl)
        self.node_id = secrets.token_hex(8)
        self._marker_base = self.node_id.encode()
        self._markers = itertools.count()
        # Pub/sub ignores the database number, so the channel names it: caches of one namespace
        # in different databases must not hear (or count, or acknowledge) each other.
        self.channel = f"tc:{namespace}:inval:{db}"
        self.seq_key = f"tc:{namespace}:seq"
        self.gen_key = f"tc:{namespace}:gen"
        #: The namespace's key roots at its current generation (see ``clear``).
        self.keyspace = KeySpace(namespace)
        self.counters = Counters()
        self.flights = FlightTable(local)
        #: Keys being refreshed ahead of expiry in this process (one refresh per key).
        self._refreshing: set[str] = set()
        self._refreshing_lock = threading.Lock()
        #: Tag and tenant versions of an L1-only cache (no Redis to keep them in).
        self._local_versions: dict[str, int] = {}
        #: The last versions read from Redis, kept through L1 flushes: a scope's best guess
        #: while Redis cannot be read (``known_versions``).
        self._known_versions: dict[str, int] = {}
        self.breaker = Breaker(threshold=breaker_threshold, cooldown=breaker_cooldown, clock=clock)
        self._last_failure: BaseException | None = None  # the cause of "breaker open" errors
        #: Applies invalidations that have arrived, from a caller's thread (set by the cache
        #: when it runs a subscriber; see _sync.Subscriber.poll).
        self.poll: Callable[[], None] = _nothing
        self.log = RateLimitedLog(clock=clock)
        #: The invalidation bus, when other processes can share this namespace. Until its
        #: subscriber confirms a subscription, L1 takes no entries (invariant 4).
        self.bus = (
            Bus(self.channel, self.node_id, self.flights, self.log, self.apply_generation, self._generation)
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
        self._refreshing = set()
        self._refreshing_lock = threading.Lock()
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
            lease_waits=c.lease_waits,
            lease_timeouts=c.lease_timeouts,
            stale_served=c.stale_served,
            load_timeouts=c.load_timeouts,
            refreshes_ahead=c.refreshes_ahead,
            errors_cached=c.errors_cached,
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
        return (yield from self.read_through(key, self.default_policy, False))

    def read_through(self, key: str, policy: Policy, load: bool) -> Flow:
        """L2, else the function (when ``load``), single-flighted per key. L1 was checked already.

        Returns the value, or MISSING when ``load`` is false and neither tier has it.
        """
        stale = MISSING
        if policy.inspect:
            entry = self.local.entry(key)
            if entry is not None:
                value, now = entry[0], self.clock()
                if now < entry[3]:
                    if type(value) is CachedError:
                        raise value.error
                    # Past fresh_until but not expired: answer now, refresh in the background.
                    self.counters.l1_hits += 1
                    if load:
                        yield from self._refresh_ahead(key, policy)
                    return value
                if now < entry[4] and type(value) is not CachedError:
                    stale = value
        if key in _LOADING.get():  # called from the loader of this very key
            return (yield from self._solo(key, policy, load))
        started = self.clock()  # timeouts count from the call, across retries
        while True:
            flight, leader = self.flights.lead_or_join(key)
            if leader:
                flight.stale = stale
                if not (load and policy.detached):
                    return (yield from self._lead(flight, key, policy, load))
                # With timeouts the load runs detached and this caller waits like any other,
                # so it can stop waiting (and take the stale value) while the load goes on.
                yield Spawn(self._lead(flight, key, policy, load), flight)
            value = yield from self._join(flight, policy, flight.stale if stale is MISSING else stale, load, started)
            if value is _SOLO:
                return (yield from self._solo(key, policy, load))
            if value is not _RETRY:
                return value

    def _solo(self, key: str, policy: Policy, load: bool) -> Flow:
        """Load ``key`` for a caller that must not wait for the load in flight, because that
        load waits for it: the caller is inside that load's function (re-entrancy), or is a
        sync call blocking the event loop that runs it. It reads Redis (taking the lease if
        the key is empty, never waiting for another's) and computes if it must, outside the
        in-flight table: through a watch, so an invalidation meanwhile keeps it out of L1."""
        watches = self.flights.watch([key])
        try:
            return (yield from self._lead(watches[0], key, policy, load))
        finally:
            self.flights.unwatch(watches)

    def _lead(self, flight: Flight, key: str, policy: Policy, load: bool) -> Flow:
        """The load of ``key`` for every caller waiting on ``flight``. The flight always ends
        and always leaves the table, whatever is raised (cancellation included)."""
        flight.thread = threading.get_ident()  # (a worker's, when detached)
        try:
            value = self.local.get(key)  # filled between our L1 miss and taking the lead?
            if value is MISSING:
                value = yield from self._load(flight, key, policy, load)
        except Exception as exc:
            self.flights.release(flight)
            if not isinstance(exc, BackendError) and self._still_stale(key, flight.stale):
                # An inline leader is a caller too; a detached one is not (its callers count).
                why = f"the function raised {type(exc).__name__}: {exc}"
                self._serve_stale(policy, why, count=not (load and policy.detached))
                flight.served_stale = True
                flight.finish(flight.stale)
                return flight.stale
            if policy.cache_errors and isinstance(exc, policy.cache_errors):
                self.counters.errors_cached += 1
                expires = self.clock() + policy.error_ttl
                self.flights.fill(flight, CachedError(exc), expires, 0, fresh_until=0.0)
            flight.fail(exc)
            raise
        except BaseException:
            self.flights.release(flight)
            flight.abandon()  # the waiters try again, one of them as the new leader
            raise
        self.flights.release(flight)
        flight.finish(value)
        if policy.early and load:
            entry = self.local.entry(key)  # an L2 hit already due for its refresh
            if entry is not None and entry[1] <= self.clock() < entry[3]:
                yield from self._refresh_ahead(key, policy)
        return value

    def _join(self, flight: Flight, policy: Policy, stale: Any, load: bool, started: float) -> Flow:
        """Wait for another caller's load of the key; _RETRY when it ended without an answer."""
        soft, hard = (policy.soft_timeout, policy.hard_timeout) if load else (None, None)
        if soft is not None:
            if (yield Wait(flight, max(0.0, soft - (self.clock() - started)))) is False:
                return _SOLO  # (a sync driver refuses a wait that would never end; see _sync.wait)
            if not flight.done and self._still_stale(flight.key, stale):
                self._serve_stale(policy, f"the function ran past soft_timeout={soft} s")
                return stale
        if hard is not None:
            if not flight.done and (yield Wait(flight, max(0.0, hard - (self.clock() - started)))) is False:
                return _SOLO
            if not flight.done:
                self.counters.load_timeouts += 1
                self.flights.release(flight)  # the next call starts a new load
                flight.dirty = True  # and the late result, if any, stays out of L1
                flight.timed_out = True  # and out of Redis
                if flight.cancel is not None:
                    flight.cancel()
                if flight.marker:  # and may take the lease (a late fill is then refused)
                    yield from self._quietly(_remote.release(flight.key, flight.marker, self.channel, self.node_id))
                if self._still_stale(flight.key, stale):
                    self._serve_stale(policy, f"the function ran past hard_timeout={hard} s")
                    return stale
                raise LoadTimeoutError(
                    f"{policy.name} did not return within hard_timeout={hard} s; raise hard_timeout, "
                    f"or give stale_ttl to answer with the last value instead"
                )
        elif not flight.done and (yield Wait(flight)) is False:
            return _SOLO
        if flight.abandoned:  # the leader was cancelled: try again, maybe as the leader
            return _RETRY
        if load and flight.value is MISSING and flight.error is None:
            return _RETRY  # we joined a cache.get() (which may not load) that found nothing
        if flight.error is not None:
            raise flight.error
        if flight.served_stale:
            self.counters.stale_served += 1
        return flight.value

    def _still_stale(self, key: str, stale: Any) -> bool:
        """Whether ``stale`` may still be served for ``key``: L1 still holds that very copy
        within its ``stale_ttl`` (an invalidation since would have removed it)."""
        if stale is MISSING:
            return False
        entry = self.local.entry(key)
        return entry is not None and entry[0] is stale and self.clock() < entry[4]

    def _serve_stale(self, policy: Policy, why: str, count: bool = True) -> None:
        if count:
            self.counters.stale_served += 1
        self.log.emit("stale", "tiercache: answering %s with a stale value: %s", policy.name, why)

    def _refresh_ahead(self, key: str, policy: Policy) -> Flow:
        """Start one background refresh of ``key`` unless one is running here. It is not a
        flight of the in-flight table: callers that come after the entry expired load it
        themselves rather than wait for a refresh that may still be queued."""
        with self._refreshing_lock:
            if key in self._refreshing:
                return
            self._refreshing.add(key)
        self.counters.refreshes_ahead += 1
        yield Spawn(self._ahead(key, policy), Flight(key))

    def _ahead(self, key: str, policy: Policy) -> Flow:
        try:
            return (yield from self.refresh(key, policy, exclusive=True))
        except Exception as exc:  # noqa: BLE001 - nobody waits for it: counted and logged
            self.log.emit("refresh", "tiercache: refresh ahead of %s failed: %r", policy.name, exc)
            return None
        finally:
            with self._refreshing_lock:
                self._refreshing.discard(key)

    def _load(self, flight: Flight, key: str, policy: Policy, load: bool) -> Flow:
        marker = LEASE_PREFIX + b"%s:%d" % (self._marker_base, next(self._markers)) if load else b""
        mine = load  # whether our marker may be in the key (unknown until the read's reply)
        try:
            op = _remote.fetch(key, marker, self.lease_ms) if load else _remote.peek(key)
            sent_at = self.clock()
            found = self._settle(op, (yield op) if self._allow() else _SKIPPED)
            if found is False and load and key not in _LOADING.get():  # (not our own lease)
                found, sent_at = yield from self._await_other(key, marker)
            mine = found is True
            if mine:
                flight.marker = marker  # a hard timeout may give the lease back
            value, data, ttl_s, sent_at = yield from self._load_rest(flight, key, policy, load, marker, found, sent_at)
            mine = False
        except BaseException:
            # Cancelled (or failed) while our marker may be in the key: give it back now rather
            # than leave this and every other process waiting for its lease TTL. The script
            # deletes only our own marker, so this is safe whatever the key holds.
            if mine:
                yield from self._quietly(_remote.release(key, marker, self.channel, self.node_id))
            raise
        if data is not None:
            # invariant 2: fill() keeps a load overtaken by an invalidation out of L1. The Redis
            # copy's TTL started after sent_at, so L1's, counted from sent_at, ends no later.
            self._fill(flight, value, self.codec.held_size(data), policy, sent_at, ttl_s)
        return value

    def _load_rest(
        self, flight: Flight, key: str, policy: Policy, load: bool, marker: bytes, found: Any, sent_at: float
    ) -> Flow:
        """After the read: decode a hit, or call the function and store its result. Returns
        ``(value, bytes to put in L1 or None, ttl, sent_at)``."""
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
                return value, data, remaining, sent_at
        self.counters.misses += 1
        if not load:
            return MISSING, None, 0.0, sent_at
        self.counters.loads += 1
        started = self.clock()
        token = _LOADING.set(_LOADING.get() | {key})
        try:
            value = yield CALL
        except Exception:
            self.counters.load_errors += 1
            raise
        finally:
            _unset(token)
        policy.record_load_time(self.clock() - started)
        data = self._encode_or_none(key, value)
        if data is None:
            if found is True:
                yield from self._quietly(_remote.release(key, marker, self.channel, self.node_id))
            return value, None, 0.0, sent_at
        ttl_s = policy.l2_ttl()
        sent_at = self.clock()
        if flight.timed_out:  # its callers gave up: store nothing (and free the key)
            if found is True:
                yield from self._quietly(_remote.release(key, marker, self.channel, self.node_id))
            return value, None, 0.0, sent_at
        if found is True:
            # invariant 3: lands only if no write or invalidation of the key came since the
            # miss (they replace our lease marker). The lease, not our local dirty mark,
            # decides: a local flush on resubscribe says nothing about Redis.
            op = _remote.fill(key, marker, data, _ms(ttl_s), self.channel, self.node_id)
            if self._settle(op, (yield op) if self._allow() else _SKIPPED) is False:
                return value, None, 0.0, sent_at  # refused: the key was written since our miss
        elif unreadable is not None:
            # Replace the unreadable bytes, unless someone wrote the key meanwhile.
            op = _remote.replace(key, unreadable, data, _ms(ttl_s))
            self._settle(op, (yield op) if self._allow() else _SKIPPED)
        return value, data, ttl_s, sent_at

    def _fill(self, flight: Flight, value: Any, size: int, policy: Policy, sent_at: float, left: float) -> None:
        """Into L1 (unless overtaken), for at most the ``left`` seconds Redis keeps it from ``sent_at``."""
        expires = sent_at + left
        stale_until = expires + policy.stale_ttl if policy.stale_ttl else None
        fresh_until = policy.fresh_until(expires)
        self.flights.fill(flight, value, sent_at + min(policy.l1_ttl, left), size, fresh_until, stale_until)

    def _await_other(self, key: str, marker: bytes) -> Flow:
        """Another process holds the key's lease: wait for its fill instead of loading too.

        Each round reads the key again in one script (``wait_lease``) that also raises the
        key's waiter flag, so the holder's fill or release is announced on the bus and ends
        our wait (``FlightTable.await_fill``; registered before the read, so an announcement
        cannot slip in between). A wait is bounded by what the other lease has left: a holder
        that died (SIGKILL) costs at most the lease TTL, after which we (or another waiter,
        whose new lease we then wait for, up to twice the lease TTL in all) take the lease.
        With no bus to hear announcements (``coherent=False``, or it is reconnecting) the
        rounds back off from 5 ms to 250 ms instead. Returns what ``fetch`` would have (a
        value, True for our lease, False: load without storing) and when its read was sent."""
        lease = self.lease_ms / 1000.0
        started = self.clock()
        deadline = started + lease
        lease_ends = 0.0
        pause = 0.005
        signal: Flight | None = None
        try:
            while True:
                signal = self.flights.await_fill(key)
                op = _remote.wait_lease(key, marker, self.lease_ms)
                sent_at = self.clock()
                got = self._settle(op, (yield op) if self._allow() else _SKIPPED)
                if got is FAILED:
                    return False, sent_at
                if type(got) is not int:
                    return got, sent_at
                now = self.clock()
                if now + got / 1000.0 > lease_ends + 0.005:
                    # A new lease (the holder died or failed, and another waiter took over):
                    # its load deserves the same wait, up to twice the lease TTL in all.
                    lease_ends = now + got / 1000.0
                    deadline = min(max(deadline, lease_ends + 0.001), started + 2 * lease)
                left = deadline - now
                if left <= 0:
                    self.counters.lease_timeouts += 1
                    return False, sent_at
                timeout = min(got / 1000.0 + 0.001, left)
                if self.bus is None or not self.bus.connected.is_set():
                    timeout, pause = min(timeout, pause), min(pause * 2, 0.25)
                self.counters.lease_waits += 1
                if (yield Wait(signal, timeout)) is False:  # refused: a sync call on an event loop
                    return False, sent_at
        finally:
            if signal is not None:
                self.flights.drop_fill(signal)

    def refresh(self, key: str, policy: Policy, exclusive: bool = False) -> Flow:
        """Call the function now and write its result to both tiers, telling every node.

        The old value keeps being served meanwhile. Invariant 3: a write or invalidation of
        the key while the function runs wins: the refresh's result is returned to its caller
        but stored nowhere (Redis refuses it, and the local watch keeps it out of L1).
        ``exclusive`` (refresh-ahead): only if no other process is refreshing the key, else
        return MISSING without calling the function."""
        token = LEASE_PREFIX + b"%s:%d" % (self._marker_base, next(self._markers))
        watches = self.flights.watch([key])
        try:
            op = _remote.begin_refresh(key, token, self.lease_ms, exclusive)
            begun = self._settle(op, (yield op) if self._allow() else _SKIPPED)
            if begun is False:
                self.flights.unwatch(watches)
                return MISSING
            self.counters.loads += 1
            started = self.clock()
            try:
                value = yield CALL
            except BaseException as exc:
                if isinstance(exc, Exception):
                    self.counters.load_errors += 1
                if begun is True:  # let the next refresh (maybe in another process) run now
                    yield from self._quietly(_remote.abandon_refresh(key, token))
                raise
            policy.record_load_time(self.clock() - started)
            data = self._encode_or_none(key, value)
            ttl_s = policy.l2_ttl()
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
        expires = sent_at + ttl_s
        self.flights.commit_write(
            watches,
            [value],
            sent_at + min(policy.l1_ttl, ttl_s),
            [self.codec.held_size(data)],
            policy.fresh_until(expires),
            expires + policy.stale_ttl if policy.stale_ttl else None,
        )
        return value

    # -- batches --------------------------------------------------------------------------

    def read_batch(self, keys: Sequence[str], items: Sequence[Any], policy: Policy, name: str) -> Flow:
        """The values of ``keys`` (distinct; ``items[i]`` is what the function needs to compute
        ``keys[i]``): from L1, else one pipelined round trip that reads every missing key and
        takes the lease of each empty one, else one call of the function with the items that
        are still missing, whose results are stored with one script (only where our lease
        still holds: invariant 3) and put into L1 unless an invalidation overtook them."""
        results: dict[str, Any] = {}
        missing: list[int] = []
        for i, key in enumerate(keys):
            value = self.local.get(key)
            if value is MISSING:
                missing.append(i)
            else:
                results[key] = value
        self.counters.l1_hits += len(results)
        if not missing:
            return results
        # Single-flight per item: lead the keys no other call here is loading, join the rest;
        # items whose call failed or was cancelled go round again (led or joined anew).
        pending = missing
        while pending:
            if pending is not missing:  # a retry: the value may have landed in L1 meanwhile
                for i in pending:
                    value = self.local.get(keys[i])
                    if value is not MISSING:
                        results[keys[i]] = value
                pending = [i for i in pending if keys[i] not in results]
            led: list[tuple[int, Flight]] = []
            joined: list[tuple[int, Flight]] = []
            # Items this context is computing (the batch function called itself with them), or
            # whose load only this thread could finish: loaded here, joining nothing.
            loading = _LOADING.get()
            alone = [i for i in pending if keys[i] in loading]
            for i in pending:
                if keys[i] not in loading:
                    flight, leader = self.flights.lead_or_join(keys[i])
                    (led if leader else joined).append((i, flight))
            if led:
                try:
                    got = yield from self._read_batch(
                        [keys[i] for i, _ in led], [items[i] for i, _ in led], policy, name
                    )
                except BaseException as exc:
                    for _, flight in led:
                        self.flights.release(flight)
                        if isinstance(exc, Exception):
                            flight.fail(exc)
                        else:
                            flight.abandon()
                    raise
                results.update(got)
                for i, flight in led:
                    self.flights.release(flight)
                    flight.finish(got[keys[i]])
            pending = []
            for i, flight in joined:
                if not flight.done and (yield Wait(flight)) is False:  # see _sync.wait
                    alone.append(i)
                elif flight.error is None and not flight.abandoned and flight.value is not MISSING:
                    results[keys[i]] = flight.value
                else:
                    pending.append(i)
            if alone:
                results.update(
                    (yield from self._read_batch([keys[i] for i in alone], [items[i] for i in alone], policy, name))
                )
        return results

    def _read_batch(self, want: Sequence[str], items: Sequence[Any], policy: Policy, name: str) -> Flow:
        """``read_batch`` of keys missing from L1 that this call leads."""
        keys = want
        missing = list(range(len(want)))
        results: dict[str, Any] = {}
        marker = LEASE_PREFIX + b"%s:%d" % (self._marker_base, next(self._markers))
        watches = self.flights.watch(want)
        entries: dict[str, tuple[Any, float, int]] = {}
        leased: list[str] = []
        unreadable: dict[str, bytes] = {}
        try:
            op = _remote.fetch_many(want, marker, self.lease_ms)
            sent_at = self.clock()
            leased = list(want)  # until the reply says which: cancelled meanwhile, free them all
            found = self._settle(op, (yield op) if self._allow() else _SKIPPED)
            leased = []
            load: list[int] = []
            for i, got in zip(missing, [FAILED] * len(want) if found is FAILED else found, strict=True):
                key = keys[i]
                if isinstance(got, tuple):
                    try:
                        value = self.codec.decode(key, got[0])
                    except CodecError as exc:
                        self.counters.codec_errors += 1
                        self.log.emit("codec", "tiercache: ignoring unreadable value in Redis: %s", exc)
                        unreadable[key] = got[0]
                    else:
                        pttl = got[1]
                        left = pttl / 1000.0 if pttl >= 0 else float("inf") if pttl == -1 else 0.0
                        results[key] = value
                        entries[key] = (value, sent_at + min(policy.l1_ttl, left), self.codec.held_size(got[0]))
                        continue
                elif got is True:
                    leased.append(key)
                load.append(i)
            self.counters.l2_hits += len(missing) - len(load)
            self.counters.misses += len(load)
            if load:
                self.counters.loads += 1
                started = self.clock()
                token = _LOADING.set(_LOADING.get().union(keys[i] for i in load))
                try:
                    values = yield CallWith([items[i] for i in load])
                except Exception:
                    self.counters.load_errors += 1
                    raise
                finally:
                    _unset(token)
                policy.record_load_time(self.clock() - started)
                if not isinstance(values, (list, tuple)) or len(values) != len(load):
                    got_len = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
                    raise TypeError(
                        f"{name} returned {got_len} results for {len(load)} items: "
                        "a batch function must return a list with one result per item, in order"
                    )
                datas: dict[str, bytes] = {}
                for i, value in zip(load, values, strict=True):
                    key = keys[i]
                    results[key] = value
                    data = self._encode_or_none(key, value)
                    if data is not None:
                        datas[key] = data
                ttl_s = policy.l2_ttl()
                sent_at = self.clock()
                store = [k for k in leased if k in datas]
                if store:
                    op = _remote.fill_many(
                        store, marker, [datas[k] for k in store], _ms(ttl_s), self.channel, self.node_id
                    )
                    self._settle(op, (yield op) if self._allow() else _SKIPPED)
                for k, old in unreadable.items():  # unless someone wrote the key meanwhile
                    if k in datas:
                        op = _remote.replace(k, old, datas[k], _ms(ttl_s))
                        self._settle(op, (yield op) if self._allow() else _SKIPPED)
                unstored = [k for k in leased if k not in datas]
                leased = []
                if unstored:
                    yield from self._quietly(_remote.release_many(unstored, marker, self.channel, self.node_id))
                for k, data in datas.items():
                    entries[k] = (results[k], sent_at + min(policy.l1_ttl, ttl_s), self.codec.held_size(data))
        except BaseException:
            self.flights.unwatch(watches)
            if leased:
                yield from self._quietly(_remote.release_many(leased, marker, self.channel, self.node_id))
            raise
        self.flights.fill_each(watches, entries)
        return results

    # -- scopes: tags and tenants ------------------------------------------------------------

    def cached_versions(self, names: Sequence[str]) -> list[int] | None:
        """The versions of ``names`` (tag and tenant counters) if L1 has them all, else None."""
        if not self.has_remote:
            return [self._local_versions.get(n, 0) for n in names]
        data, now, out = self.local._data, self.clock(), []
        for name in names:
            entry = data.get(name)
            if entry is None or entry[1] <= now:
                return None
            try:
                data.move_to_end(name)  # in use: the LRU must not evict it before its entries
            except KeyError:
                pass
            out.append(entry[0])
        return out

    def known_versions(self, names: Sequence[str]) -> list[int]:
        """The last versions of ``names`` this process saw, expired or not (0 when never seen):
        the best guess at a scope while Redis cannot be read."""
        known = self._known_versions
        return [known.get(name, 0) for name in names]

    def versions(self, names: Sequence[str]) -> Flow:
        """The versions of ``names``: from L1, else one MGET (cached in L1 for ``l1_ttl``, unless
        an invalidation of a counter overtook the read). None when Redis cannot say: the call
        then must not use the cache (its key is unknown)."""
        cached = self.cached_versions(names)
        if cached is not None:
            return cached
        watches = self.flights.watch(names)
        sent_at = self.clock()
        op = _remote.versions(names)
        try:
            got = self._settle(op, (yield op) if self._allow() else _SKIPPED)
        except BaseException:
            self.flights.unwatch(watches)
            raise
        if got is FAILED:
            self.flights.unwatch(watches)
            return None
        expires = sent_at + self.l1_ttl
        self.flights.fill_each(watches, {n: (v, expires, 8) for n, v in zip(names, got, strict=True)})
        if len(self._known_versions) >= 4096:
            self._known_versions.clear()
        self._known_versions.update(zip(names, got, strict=True))
        return got

    def scoped_read(self, base: str, tenant: str | None, names: Sequence[str], policy: Policy) -> Flow:
        """``read_through`` of ``base`` in its scope (tenant, tag versions), loading them first."""
        versions = yield from self.versions(names)
        local = self.local
        if versions is None and self.bus is not None and not local.accepting and local.outage and local.outage_ttl:
            # An outage (the bus is down too): the last versions we knew make a key good for
            # this process's L1 alone, where it lives at most outage_ttl (see LocalCache), so
            # tagged and tenant calls protect the backend like the others.
            versions = self.known_versions(names)
        if versions is None:  # no versions, no key: answer from the function, cache nothing
            self.counters.misses += 1
            self.counters.loads += 1
            return (yield CALL)
        key = scoped_key(base, tenant, versions)
        value = self.local.get(key)
        if value is not MISSING:
            self.counters.l1_hits += 1
            return value
        return (yield from self.read_through(key, policy, True))

    def scope_key(self, base: str, tenant: str | None, names: Sequence[str]) -> Flow:
        """The key of ``base`` in its scope now; None when the versions cannot be read."""
        if not names:
            return base
        versions = yield from self.versions(names)
        return None if versions is None else scoped_key(base, tenant, versions)

    def in_scope(
        self, base: str, tenant: str | None, names: Sequence[str], then: Callable[[str], Flow], otherwise: Any
    ) -> Flow:
        """Run ``then(key)`` with ``base``'s key in its scope; ``otherwise`` if it is unknown."""
        key = yield from self.scope_key(base, tenant, names)
        if key is None:
            return otherwise
        return (yield from then(key))

    def _generation(self) -> str:
        return self.keyspace.generation

    def apply_generation(self, generation: str, forward_only: bool = True) -> None:
        """Adopt the namespace's generation (from the bus, our own ``clear``, or read when
        subscribing: ``forward_only=False``): new keys from now on, and L1 emptied (loads in
        flight dirtied) since it holds the old ones."""
        if self.keyspace.advance(generation, forward_only):
            self.flights.flush(accepting=self.local.accepting, keep_stale=False)

    def clear(self, wait: float | None) -> Flow:
        """Drop every entry of the namespace in every process, in O(1): a new generation, so
        every key changes; the old entries are never read again and expire by their TTL."""
        if not self.has_remote:
            self.apply_generation(str(_generation_number(self.keyspace.generation) + 1))
            return WriteResult(None, None, None)
        ack_key = f"tc:{self.namespace}:ack:{secrets.token_hex(8)}" if wait is not None else ""
        current = max(_generation_number(self.keyspace.generation), 0)
        op = _remote.clear(self.seq_key, self.gen_key, self.channel, self.node_id, current, ack_key)
        reply = self._settle(op, (yield op) if self._allow() else _SKIPPED)
        if reply is FAILED:
            return WriteResult(None, None, None)
        seq, receivers, generation = reply
        self.apply_generation(generation)
        if wait is None:
            return WriteResult(seq, receivers)
        acknowledged = yield from self._await_acks(ack_key, receivers, wait)
        return WriteResult(seq, receivers, acknowledged)

    def bump(self, names: Sequence[str], wait: float | None) -> Flow:
        """Invalidate every entry scoped by ``names`` (tags, tenants) at once: increment their
        version counters and tell every process to drop its cached versions. O(1) in the
        number of entries: they are never read again, and expire by their TTL."""
        if not names:
            return WriteResult(None, 0, None)
        if not self.has_remote:
            for name in names:
                self._local_versions[name] = self._local_versions.get(name, 0) + 1
        return (yield from self._write(names, None, 0.0, None, None, wait, incr=True))

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
        incr: bool = False,
    ) -> Flow:
        """Redis first (one script: write, sequence number, publish), then this process's L1.

        ``wait`` (seconds): also wait until every subscriber that received the message has
        acknowledged applying it, or until that many seconds passed.
        """
        ack_key = f"tc:{self.namespace}:ack:{secrets.token_hex(8)}" if wait is not None else ""
        watches = self.flights.watch(keys)
        sent_at = self.clock()
        op = _remote.write(self.seq_key, self.channel, self.node_id, keys, datas, _ms(ttl), ack_key, incr)
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
        sizes = [self.codec.held_size(d) for d in datas] if datas is not None else []
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


def _unset(token: contextvars.Token[frozenset[str]]) -> None:
    try:
        _LOADING.reset(token)
    except ValueError:  # a flow closed (collected) in another context: nothing of ours there
        pass


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))

"""The invalidation subscriber: one thread per cache that keeps L1 coherent over pub/sub.

Its connection's liveness is ``Health``, a pure state machine on an injected clock that both
listen loops (the raw socket and the redis-py connection) run, and a unit test drives.
"""

from __future__ import annotations

import enum
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ._coherence import Bus
from ._metrics import RateLimitedLog
from ._remote import RedisOp, RemoteFailure, ack, probe_publish, sync_generation
from ._sync import SyncRedis
from ._types import RNG

__all__ = ["Check", "HalfOpenError", "Health", "Subscriber"]

try:  # redis-py's marker for "no complete reply buffered" in its hiredis reader
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NOT_ENOUGH_DATA
except ImportError:  # pragma: no cover - another redis-py layout: use the portable loop
    _NOT_ENOUGH_DATA = None


class HalfOpenError(ConnectionError):
    """The subscriber's connection stayed silent past the health deadline."""


class Check(enum.Enum):
    """What ``Health.step`` asks of the listen loop."""

    NOTHING = "nothing"
    PING = "ping"  # send PING now
    GIVE_UP = "give up"  # nothing arrived within the deadline after the PING: half-open


class Health:
    """Liveness of a connection that must hear something (a message, a PONG) now and then.

    When nothing arrived for ``interval`` seconds, ``step`` asks for one PING; when nothing at
    all arrived within ``deadline`` seconds after it, ``step`` gives up. A half-open socket is
    therefore noticed within ``interval + deadline`` (the staleness bound). Pure: the caller
    passes the time (``time.monotonic()``), reports what it heard, and does the I/O.
    """

    __slots__ = ("_heard", "_ping_sent", "deadline", "interval")

    def __init__(self, interval: float, deadline: float, now: float) -> None:
        self.interval = interval
        self.deadline = deadline
        self._heard = now
        self._ping_sent: float | None = None

    def heard(self, now: float) -> None:
        """Something arrived at ``now``: the connection is alive (and a PING sent before it
        is answered: the PONG, or anything else, proves as much)."""
        self._heard = now
        if self._ping_sent is not None and now >= self._ping_sent:
            self._ping_sent = None

    def due(self) -> float:
        """When the next check is due (on the caller's clock): until then, ``step`` does nothing.
        Idle: when a PING will be due; PING sent: when its reply is overdue."""
        if self._ping_sent is None:
            return self._heard + self.interval
        return self._ping_sent + self.deadline

    def step(self, now: float) -> Check:
        """What to do at ``now``; a PING asked for counts as sent at ``now`` (one at a time)."""
        if self._ping_sent is None:
            if now - self._heard >= self.interval:
                self._ping_sent = now
                return Check.PING
        elif now - self._ping_sent >= self.deadline:
            return Check.GIVE_UP
        return Check.NOTHING


class Subscriber:
    """The invalidation subscriber: one thread per cache, serving sync and async code alike.

    It keeps its own connection (not redis-py's PubSub, which reconnects and resubscribes
    silently and so would hide lost messages). Each (re)subscription is confirmed, then the
    sequence number is read and only then is L1 trusted again (``Bus.subscribed`` flushes it).
    Liveness (``Health``): when nothing arrived for ``interval`` seconds it sends PING and
    requires a reply within ``deadline`` seconds; a half-open socket is therefore noticed within
    ``interval + deadline`` (the documented staleness bound), and L1 is flushed and turned off
    until a new subscription is confirmed. The read loop only parses and evicts: nothing the
    user wrote runs on this thread, so a burst cannot back it up into Redis's output-buffer limit.
    """

    MIN_BACKOFF = 0.05
    MAX_BACKOFF = 2.0
    MAX_BATCH = 1024
    STABLE_AFTER = 5.0  # seconds a connection must last before the reconnect backoff starts over
    #: Callers poll at most this often (seconds). Each poll releases and retakes the GIL (its
    #: non-blocking recv), and polls back to back defeat Python's forced switch interval: the
    #: subscriber thread then starved (a PING from another thread took a median 358 ms, not
    #: 11 ms). Spaced, the thread runs, and a busy process still applies invalidations itself.
    POLL_SPACING = 0.01

    def __init__(
        self, remote: SyncRedis, bus: Bus, seq_key: str, interval: float, deadline: float, log: RateLimitedLog
    ) -> None:
        self._remote = remote
        self._bus = bus
        self._seq_key = seq_key
        self._gen_key = bus.keyspace.gen_key
        self._interval = interval
        self._deadline = deadline
        self._log = log
        self._stopping = threading.Event()
        self._conn: redis.Connection | None = None
        self._raw: tuple[socket.socket, Any] | None = None
        self._drain_lock = threading.Lock()
        self._health = Health(interval, deadline, time.monotonic())
        self._polled_at = 0.0
        self._next_poll = 0.0
        self._dead = False  # set by a caller's poll that found the connection broken
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._pending_acks: list[str] = []
        self._probed = False
        self._thread = threading.Thread(target=self._run, name=f"tiercache-bus-{bus.channel}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._wake()
        conn = self._conn
        if conn is not None:
            _shutdown(conn)  # wake the read loop now rather than at its next timeout
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self._wake_r.close()
            self._wake_w.close()

    def _new_connection(self) -> redis.Connection:
        pool = self._remote.pool
        kwargs = dict(pool.connection_kwargs)
        kwargs["socket_timeout"] = self._deadline
        kwargs["socket_connect_timeout"] = self._deadline
        kwargs["retry"] = Retry(NoBackoff(), 0)
        kwargs.pop("health_check_interval", None)
        conn: redis.Connection = pool.connection_class(**kwargs)
        return conn

    def _run(self) -> None:
        backoff = self.MIN_BACKOFF
        while not self._stopping.is_set():
            conn = self._new_connection()
            self._conn = conn
            subscribed_at: float | None = None
            try:
                if not self._subscribe(conn):
                    break
                subscribed_at = time.monotonic()
                self._listen(conn)
            except Exception as exc:  # noqa: BLE001 - this thread must outlive anything a socket does
                if not self._stopping.is_set():
                    self._report_loss(exc)
            finally:
                with self._drain_lock:  # no caller may be reading this socket as it closes
                    self._raw = None
                    self._dead = False
                if self._bus.connected.is_set() or self._bus.last_seq is not None:
                    self._bus.lost()
                self._conn = None
                _shutdown(conn)
            # Reconnect with exponential backoff and full jitter, so many processes that lost
            # the same server do not reconnect in lockstep. The backoff starts over only after
            # a connection that lasted: one that subscribes and then fails at once keeps backing off.
            if subscribed_at is not None and time.monotonic() - subscribed_at > self.STABLE_AFTER:
                backoff = self.MIN_BACKOFF
            self._stopping.wait(RNG.uniform(0, backoff))
            backoff = min(backoff * 2, self.MAX_BACKOFF)

    def _subscribe(self, conn: redis.Connection) -> bool:
        """One subscription attempt on ``conn``: SUBSCRIBE, probe once, read the base sequence
        and generation, and tell the bus; False when the subscriber is stopping meanwhile."""
        conn.connect()  # type: ignore[no-untyped-call]
        conn.send_command("SUBSCRIBE", *self._bus.channels)  # type: ignore[no-untyped-call]
        for _ in self._bus.channels:
            reply = conn.read_response(push_request=True)
            if not (isinstance(reply, list) and reply and reply[0] == b"subscribe"):
                raise redis.ResponseError(f"unexpected reply to SUBSCRIBE: {reply!r}")
        if not self._probed:  # once: each probe reaches every subscriber
            self._probe_publish()
        base, generation = self._remote.execute(self._sync_generation())
        if self._stopping.is_set():
            return False
        self._bus.subscribed(base, generation)
        return True

    def _report_loss(self, exc: Exception) -> None:
        """Log a lost subscription (and remember a denied SUBSCRIBE for the bus to report)."""
        cause = exc.__cause__ if isinstance(exc, RemoteFailure) else exc
        if isinstance(cause, redis.exceptions.NoPermissionError):
            self._bus.denied = self._denied("SUBSCRIBE", cause)
        self._log.emit(
            "bus",
            "tiercache: invalidation subscriber lost (%s: %s); L1 flushed, and its entries live at most "
            "outage_l1_ttl until resubscribed",
            type(cause).__name__,
            cause,
        )

    def _listen(self, conn: redis.Connection) -> None:
        reader = getattr(getattr(conn, "_parser", None), "_reader", None)
        sock = getattr(conn, "_sock", None)
        # A plain TCP or unix socket (not TLS, whose buffered records a selector cannot see)
        # read through redis-py's hiredis reader: see _listen_raw.
        if reader is not None and type(sock) is socket.socket and _NOT_ENOUGH_DATA is not None:
            self._listen_raw(sock, reader)
        else:  # redis-py's pure-Python parsers, TLS, fakeredis: read through the connection
            self._listen_conn(conn)

    def _check(self, health: Health, ping: Callable[[], object]) -> None:
        """Run the health check now: ``ping()`` when a PING is due, HalfOpenError when overdue."""
        check = health.step(time.monotonic())
        if check is Check.PING:
            ping()
        elif check is Check.GIVE_UP:
            raise HalfOpenError(f"no reply to PING within {health.deadline} s")

    def _listen_raw(self, sock: socket.socket, reader: Any) -> None:
        """The loop on the raw socket: wait until it is readable, then ``_service`` it: read
        what has arrived without blocking into redis-py's hiredis reader, apply it, and run the
        health check (PING when idle, give up when no reply comes in time).

        Callers take the same ``_service`` path every 256 L1 hits of a function (``poll``): in
        a CPU-bound process this thread waits up to ``sys.getswitchinterval()`` (5 ms) for
        the GIL after every blocking call, so the thread that holds the GIL applies pending
        invalidations, and keeps the staleness bound, itself; meanwhile this thread leaves
        the socket to the callers and only sends the acknowledgements they queued."""
        self._health = Health(self._interval, self._deadline, time.monotonic())
        # Non-blocking: a socket with a timeout waits for readability even under MSG_DONTWAIT,
        # and callers' threads must never wait here.
        sock.settimeout(0.0)
        with self._drain_lock:
            self._raw = (sock, reader)
        selector = selectors.DefaultSelector()  # select() fails on descriptors >= 1024
        selector.register(sock, selectors.EVENT_READ)
        selector.register(self._wake_r, selectors.EVENT_READ)  # stop() and poll() wake us
        try:
            while not self._stopping.is_set():
                self._send_acks()
                if self._bus.resync:
                    self._resync()
                if self._dead:
                    raise redis.ConnectionError("the subscriber connection failed (seen by a caller)")
                for key, _ in selector.select(max(0.0, self._health.due() - time.monotonic())):
                    if key.fileobj is self._wake_r:
                        self._drain_wakeups()
                if time.monotonic() - self._polled_at < 0.002:
                    # Callers are polling (a busy process). Taking the lock here would hold it
                    # through every wait for the GIL, and they already keep the bound.
                    self._stopping.wait(0.001)
                    continue
                with self._drain_lock:
                    self._service(sock, reader)
        finally:
            selector.close()

    def _service(self, sock: socket.socket, reader: Any) -> None:
        """Read and apply what has arrived, then the health check. Caller holds ``_drain_lock``."""
        health = self._health
        while True:
            try:
                data = sock.recv(65536, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            if not data:
                raise redis.ConnectionError("the server closed the subscriber connection")
            reader.feed(data)
            health.heard(time.monotonic())
            if len(data) < 65536:
                break
        payloads: list[bytes] = []
        while (reply := reader.gets()) is not _NOT_ENOUGH_DATA:
            if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message":
                payloads.append(reply[2])
        if payloads:
            self._pending_acks.extend(self._bus.handle(payloads))
        self._check(health, lambda: sock.send(b"*1\r\n$4\r\nPING\r\n"))

    def poll(self) -> None:
        """From a caller's thread: apply invalidations that have arrived and run the health
        check (see _listen_raw). Never blocks, never does network I/O beyond a non-blocking
        read (and a PING when due), never raises: when it finds the connection broken it turns
        L1 off at once and leaves the reconnecting to the subscriber's own thread."""
        if self._raw is None:
            return
        now = time.monotonic()
        if now < self._next_poll:
            return
        self._next_poll = now + self.POLL_SPACING
        self._polled_at = now
        if not self._drain_lock.acquire(blocking=False):
            return
        try:
            raw = self._raw
            if raw is not None and not self._dead:
                self._service(*raw)
        except Exception:  # noqa: BLE001 - the connection is gone or half-open
            self._dead = True
            self._polled_at = 0.0  # let the subscriber thread take over and reconnect
            self._bus.lost()
            self._wake()
        finally:
            self._drain_lock.release()
        if self._pending_acks or self._bus.resync:
            self._wake()  # a wait=True writer is waiting (or a resync): this thread does it now

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"w")
        except OSError:  # full (it is already awake) or closed
            pass

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _probe_publish(self) -> None:
        """Writes publish their invalidations from Lua scripts: without the right to PUBLISH
        they would land in Redis, report a failure, and tell no other process. Find it now."""
        bus = self._bus
        try:
            self._remote.execute(probe_publish(bus.channel, bus.node_id))
            self._probed = True
        except RemoteFailure as exc:
            if not isinstance(exc.__cause__, redis.exceptions.NoPermissionError):
                raise
            bus.denied = self._denied("PUBLISH", exc.__cause__)
            self._log.emit("acl", "tiercache: %s", bus.denied)
        else:
            bus.denied = None

    def _denied(self, command: str, cause: BaseException) -> str:
        channel = self._bus.channel
        return (
            f"the Redis user may not {command} on {channel!r} ({cause}): without it, writes and "
            "invalidations do not reach the other processes. Grant it, e.g. ACL SETUSER <user> "
            f"+publish +subscribe &tc:{channel.split(':')[1]}:*"
        )

    def _sync_generation(self) -> RedisOp:
        bus = self._bus
        return sync_generation(self._seq_key, self._gen_key, bus.keyspace.generation_number(), bus.channel, bus.node_id)

    def _resync(self) -> None:
        """The sequence broke (a FLUSHALL?): make sure the generation did not go backwards in
        Redis. If it did, the script starts one above ours and announces it; we adopt what it
        returns (our own announcement is then old news)."""
        self._bus.resync = False
        try:
            _, generation = self._remote.execute(self._sync_generation())
        except RemoteFailure:
            return  # the subscription fails too, and every resubscription runs the same check
        self._bus.apply_generation(generation)

    def _send_acks(self) -> None:
        """Acknowledgements queued by ``_service`` (on any thread), sent from this thread only:
        a caller's poll must not do a round trip (it may be an event loop)."""
        while self._pending_acks:
            ack_key = self._pending_acks.pop(0)
            try:
                self._remote.execute(ack(ack_key, self._bus.node_id))
            except RemoteFailure:
                pass  # the writer's wait times out and reports fewer acknowledgements

    def _listen_conn(self, conn: redis.Connection) -> None:
        """The loop through the redis-py connection (TLS, pure-Python parsers, fakeredis): wait
        until something arrives or the health check is due, apply it or run the check."""
        clock = time.monotonic
        health = Health(self._interval, self._deadline, clock())
        while not self._stopping.is_set():
            if conn.can_read(timeout=max(health.due() - clock(), 0.0)):
                self._drain(conn)
                health.heard(clock())
                continue
            self._check(health, lambda: conn.send_command("PING"))  # type: ignore[no-untyped-call]

    def _drain(self, conn: redis.Connection) -> None:
        """Read everything that has arrived (up to MAX_BATCH replies) and apply it as a batch."""
        payloads: list[bytes] = []
        for _ in range(self.MAX_BATCH):
            reply = conn.read_response(push_request=True)
            if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message":
                payloads.append(reply[2])
            if not conn.can_read(timeout=0):
                break
        self._apply(payloads)

    def _apply(self, payloads: list[bytes]) -> None:
        self._pending_acks.extend(self._bus.handle(payloads))
        self._send_acks()
        if self._bus.resync:
            self._resync()


def _shutdown(conn: redis.Connection) -> None:
    sock = getattr(conn, "_sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    try:
        conn.disconnect()  # type: ignore[no-untyped-call]
    except Exception:  # noqa: BLE001, S110 - closing a socket we are abandoning anyway
        pass

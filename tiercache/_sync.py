"""The sync I/O driver: runs flows with redis-py's blocking connections and threading.

Commands go straight to a pooled connection (send, read, release): redis-py's
``execute_command`` would add its own retry loop (about ten attempts with backoff by default)
and ~10 µs of overhead per call; tiercache fails open instead, and the breaker in the flow
decides when to try Redis again.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError
from redis.retry import Retry

from ._coherence import Bus
from ._flight import ELSEWHERE, Flight
from ._keys import _generation_number
from ._metrics import RateLimitedLog
from ._remote import RedisOp, RemoteFailure, UnreadableReply, ack, probe_publish, sync_generation
from ._steps import CallWith, Flow, Reply, Spawn, Wait
from ._types import CALL, RNG

R = TypeVar("R")

__all__ = ["Subscriber", "SyncRedis", "drive"]


class SyncRedis:
    """Executes RedisOps on a redis-py connection pool."""

    __slots__ = ("pool",)

    def __init__(self, pool: redis.ConnectionPool) -> None:
        self.pool = pool

    def execute(self, op: RedisOp) -> Any:
        try:
            conn = self.pool.get_connection()
        except Exception as exc:  # whatever the client raises, the flow fails open
            raise RemoteFailure() from exc
        try:
            try:
                if op.more:
                    conn.send_packed_command(conn.pack_commands([op.args, *op.more]))  # type: ignore[no-untyped-call]
                    reply = [conn.read_response() for _ in range(1 + len(op.more))]
                else:
                    conn.send_command(*op.args)  # type: ignore[no-untyped-call]
                    reply = conn.read_response()
            except NoScriptError:
                conn.send_command(*op.fallback_args())  # type: ignore[no-untyped-call]
                reply = conn.read_response()
        except BaseException as exc:
            # A reply may still be on its way: never reuse this socket. (Racing close(), the
            # client can raise other things than RedisError: e.g. TypeError on a socket the
            # pool has just closed. Those are Redis failures too, for the flow to fail open.)
            try:
                conn.disconnect()  # type: ignore[no-untyped-call]
                self.pool.release(conn)
            except Exception:  # noqa: BLE001, S110 - the connection is being thrown away
                pass
            if isinstance(exc, Exception):
                raise RemoteFailure() from exc
            raise
        self.pool.release(conn)
        if op.parse is None:
            return reply
        try:
            return op.parse(reply)
        except Exception as exc:  # a reply we cannot read (e.g. a foreign value): fail open
            raise UnreadableReply() from exc

    def close(self) -> None:
        self.pool.disconnect()


def wait(flight: Flight, timeout: float | None = None) -> bool:
    """Block until ``flight`` ends or ``timeout`` passed; False, at once, when blocking this
    thread would keep it from ever ending (then the flow loads without waiting):

    - its leader is this thread: an outer frame (a loader that reads its own key) or, for
      an async leader, this thread's event loop, which a sync call made from a coroutine
      blocks (issue 9, items 6 and 7);
    - it waits for a lease's holder (``ELSEWHERE``) while this thread runs an event loop:
      the holder may be a load of this very loop (its flight detached by a flush), which
      cannot fill while the loop is blocked, and a wait of up to ``lease_ttl`` would stall
      every task of the loop."""
    home = flight.thread
    if home is not None and (home == threading.get_ident() or (home == ELSEWHERE and _loop_running())):
        return False
    done = threading.Event()
    if flight.add_waiter(done.set):
        done.wait(timeout)
    return True


def _loop_running() -> bool:
    """Whether this thread is running an asyncio event loop (a sync call from a coroutine)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


_workers: ThreadPoolExecutor | None = None
_workers_lock = threading.Lock()
#: Threads that run detached loads (``soft_timeout``/``hard_timeout``) and refreshes ahead
#: of expiry, shared by every cache of the process. Bounded: functions that hang past their
#: hard timeout can occupy them all; later loads then queue and their callers time out too.
BACKGROUND_WORKERS = 32


def spawn(step: Spawn, remote: SyncRedis | None, call: Callable[[], Any] | None) -> None:
    """Run ``step.flow`` on a worker thread, in a copy of the caller's context (contextvars)."""
    global _workers  # noqa: PLW0603 - created on first use, replaced after a fork
    if _workers is None:
        with _workers_lock:
            if _workers is None:
                _workers = ThreadPoolExecutor(BACKGROUND_WORKERS, thread_name_prefix="tiercache-load")
    context = contextvars.copy_context()
    step.flight.thread = None  # a worker's, once it starts the load (not the caller's thread)
    _workers.submit(context.run, _drive_quietly, step.flow, remote, call)


def _drive_quietly(flow: Flow[Any], remote: SyncRedis | None, call: Callable[[], Any] | None) -> None:
    try:
        drive(flow, remote, call)
    except Exception:  # noqa: BLE001, S110 - the flow handed its outcome to its flight already
        pass


def _forget_workers() -> None:
    global _workers, _workers_lock  # the parent's threads do not exist in a child
    _workers, _workers_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_workers)


def drive(flow: Flow[R], remote: SyncRedis | None, call: Callable[..., Any] | None) -> R:
    """Run ``flow`` to its end, doing each step it yields, and return what it returns."""
    reply: Reply = None
    error: BaseException | None = None
    while True:
        try:
            step = flow.throw(error) if error is not None else flow.send(reply)
        except StopIteration as stop:
            result: R = stop.value
            return result
        error = reply = None
        try:
            if step is CALL:
                reply = call()  # type: ignore[misc]
            elif type(step) is CallWith:
                reply = call(step.arg)  # type: ignore[misc]
            elif type(step) is Wait:
                reply = wait(step.flight, step.timeout)
            elif type(step) is Spawn:
                spawn(step, remote, call)
            else:
                reply = remote.execute(step)  # type: ignore[union-attr]
        except RemoteFailure as failure:  # a reply like any other: the flow settles it
            reply = failure
        except BaseException as exc:  # noqa: BLE001 - thrown into the flow, which decides
            error = exc


try:  # redis-py's marker for "no complete reply buffered" in its hiredis reader
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NOT_ENOUGH_DATA
except ImportError:  # pragma: no cover - another redis-py layout: use the portable loop
    _NOT_ENOUGH_DATA = None


class HalfOpenError(ConnectionError):
    """The subscriber's connection stayed silent past the health deadline."""


class Subscriber:
    """The invalidation subscriber: one thread per cache, serving sync and async code alike.

    It keeps its own connection (not redis-py's PubSub, which reconnects and resubscribes
    silently and so would hide lost messages). Each (re)subscription is confirmed, then the
    sequence number is read and only then is L1 trusted again (``Bus.subscribed`` flushes it).
    Liveness: when nothing arrived for ``interval`` seconds it sends PING and requires a reply
    within ``deadline`` seconds; a half-open socket is therefore noticed within
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
        self._gen_key = seq_key.removesuffix("seq") + "gen"
        self._interval = interval
        self._deadline = deadline
        self._log = log
        self._stopping = threading.Event()
        self._conn: redis.Connection | None = None
        self._raw: tuple[socket.socket, Any] | None = None
        self._drain_lock = threading.Lock()
        self._heard = 0.0
        self._polled_at = 0.0
        self._next_poll = 0.0
        self._ping_sent: float | None = None
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
                    break
                self._bus.subscribed(base, generation)
                subscribed_at = time.monotonic()
                self._listen(conn)
            except Exception as exc:  # noqa: BLE001 - this thread must outlive anything a socket does
                if not self._stopping.is_set():
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

    def _listen(self, conn: redis.Connection) -> None:
        reader = getattr(getattr(conn, "_parser", None), "_reader", None)
        sock = getattr(conn, "_sock", None)
        # A plain TCP or unix socket (not TLS, whose buffered records a selector cannot see)
        # read through redis-py's hiredis reader: see _listen_raw.
        if reader is not None and type(sock) is socket.socket and _NOT_ENOUGH_DATA is not None:
            self._listen_raw(sock, reader)
        else:  # redis-py's pure-Python parsers, TLS, fakeredis: read through the connection
            self._listen_conn(conn)

    def _listen_raw(self, sock: socket.socket, reader: Any) -> None:
        """The loop on the raw socket: wait until it is readable, then ``_service`` it: read
        what has arrived without blocking into redis-py's hiredis reader, apply it, and run the
        health check (PING when idle, give up when no reply comes in time).

        Callers take the same ``_service`` path every 256 L1 hits of a function (``poll``): in
        a CPU-bound process this thread waits up to ``sys.getswitchinterval()`` (5 ms) for
        the GIL after every blocking call, so the thread that holds the GIL applies pending
        invalidations, and keeps the staleness bound, itself; meanwhile this thread leaves
        the socket to the callers and only sends the acknowledgements they queued."""
        self._heard = time.monotonic()
        self._ping_sent = None
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
                due = self._next_due()
                for key, _ in selector.select(max(0.0, due - time.monotonic())):
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

    def _next_due(self) -> float:
        if self._ping_sent is None:
            return self._heard + self._interval
        return self._ping_sent + self._deadline

    def _service(self, sock: socket.socket, reader: Any) -> None:
        """Read and apply what has arrived, then the health check. Caller holds ``_drain_lock``."""
        while True:
            try:
                data = sock.recv(65536, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            if not data:
                raise redis.ConnectionError("the server closed the subscriber connection")
            reader.feed(data)
            self._heard = time.monotonic()
            if len(data) < 65536:
                break
        payloads: list[bytes] = []
        while (reply := reader.gets()) is not _NOT_ENOUGH_DATA:
            if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message":
                payloads.append(reply[2])
        if payloads:
            self._pending_acks.extend(self._bus.handle(payloads))
        now = time.monotonic()
        if self._ping_sent is not None and self._heard >= self._ping_sent:
            self._ping_sent = None  # the PONG (or anything) arrived
        if self._ping_sent is None:
            if now - self._heard >= self._interval:
                sock.send(b"*1\r\n$4\r\nPING\r\n")
                self._ping_sent = now
        elif now - self._ping_sent >= self._deadline:
            raise HalfOpenError(f"no reply to PING within {self._deadline} s")

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
        return sync_generation(
            self._seq_key, self._gen_key, _generation_number(bus.generation()), bus.channel, bus.node_id
        )

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
        clock = time.monotonic
        last_heard = clock()
        ping_sent: float | None = None
        while not self._stopping.is_set():
            now = clock()
            # idle: until the next PING is due; PING sent: until its reply is overdue
            due = last_heard + self._interval if ping_sent is None else ping_sent + self._deadline
            wait_for = due - now
            if conn.can_read(timeout=max(wait_for, 0.0)):
                self._drain(conn)
                last_heard, ping_sent = clock(), None
                continue
            now = clock()
            if ping_sent is None:
                if now - last_heard >= self._interval:
                    conn.send_command("PING")  # type: ignore[no-untyped-call]
                    ping_sent = now
            elif now - ping_sent >= self._deadline:
                raise HalfOpenError(f"no reply to PING within {self._deadline} s")

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

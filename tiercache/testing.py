"""An in-memory Redis (L2 and invalidation bus) for your own tests, with fault injection.

``MemoryRedis`` stands in for a Redis deployment the way httpx's ``MockTransport`` stands in
for a server: the caches it makes are real :class:`~tiercache.TieredCache` objects (sync and
async) on one in-memory server (fakeredis; lupa runs the Lua scripts), coherent over its
pub/sub as processes are over Redis, and no socket is opened. Faults (Redis down, one cache
partitioned, bus messages dropped, held or delayed) are injected where a network would put
them, so the caches react through their real code paths. See docs/testing.md. Needs the
``testing`` extra: ``pip install 'tiercache[testing]'``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.util
import itertools
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any, ClassVar, NoReturn, cast

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from ._cache import TieredCache
from .errors import ConfigError

_MISSING_EXTRA = "tiercache.testing needs fakeredis>=2.41 and lupa: pip install 'tiercache[testing]'"
try:
    import fakeredis
    from fakeredis._core import FakeSelector
    from fakeredis._socket import AsyncFakeSocket, FakeSocket
    from fakeredis.aioredis import FakeAsyncRedisConnection
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(_MISSING_EXTRA) from exc
if importlib.util.find_spec("lupa") is None:  # pragma: no cover - fakeredis runs the Lua scripts with it
    raise ImportError(_MISSING_EXTRA)

__all__ = ["MemoryRedis"]

_BUS_MESSAGES = (b"message", b"pmessage", b"smessage")
_FOREVER = float("inf")


def _reset() -> redis.ConnectionError:
    return redis.ConnectionError("tiercache.testing: the connection was reset by a fault (MemoryRedis)")


class _Node:
    """One client of the server (a cache, or the fault-free ``backend.redis``): its faults and sockets."""

    def __init__(self, backend: MemoryRedis, name: str, exempt: bool = False) -> None:
        self.backend = backend
        self.name = name
        self.exempt = exempt  # backend.redis: never cut, never delayed, never dropped
        self.partitioned = ""  # "", "reset" or "silent"
        self.drop = 0.0  # bus messages to drop for this node (inf: all)
        self.hold = False
        self.delay = 0.0
        self.sockets: weakref.WeakSet[_SyncSocket] = weakref.WeakSet()

    def adopt(self, fake: FakeSocket, kind: type[_SyncSocket]) -> _SyncSocket:
        """``fake``, a socket fakeredis just made for this node, given the fault hooks."""
        fake.__class__ = kind  # the same object (no state to copy), with the hooks
        sock = cast(_SyncSocket, fake)
        sock.tc_node = self
        with self.backend._lock:  # _cut iterates the set from another thread
            self.sockets.add(sock)
        return sock

    @property
    def cut(self) -> bool:
        """Connections refused and reset."""
        return not self.exempt and "reset" in (self.partitioned, self.backend._down)

    @property
    def silent(self) -> bool:
        """A black hole: what is sent arrives only after the fault (TCP retransmits), if still wanted."""
        return not self.exempt and not self.cut and "silent" in (self.partitioned, self.backend._down)

    def refuse(self) -> None:
        if self.cut:
            why = "partitioned (MemoryRedis.partition)" if self.partitioned else "down (MemoryRedis.down)"
            raise redis.ConnectionError(f"tiercache.testing: Redis is unreachable from {self.name}: {why}")


class _SyncSocket(FakeSocket):
    """The server's side of one connection: refuses commands while its node is cut, and routes
    what the server sends through the backend's message faults."""

    tc_node: _Node
    tc_dead = False  # a subscriber connection torn down by a cut: never usable again
    tc_unsent: list[Any] | None = None  # sent into a black hole: arrives when it ends

    def sendall(self, data: Any) -> None:
        if self.tc_dead:
            raise _reset()
        self.tc_node.refuse()
        if self.tc_node.silent:
            with self.tc_node.backend._lock:
                self.tc_unsent = [*(self.tc_unsent or ()), data]
            return
        super().sendall(data)

    def tc_send_now(self, data: Any) -> None:
        if self.responses is not None:  # the client has not given up on this connection
            super().sendall(data)

    def put_response(self, msg: Any) -> None:
        self.tc_node.backend._route(self, msg)

    def tc_put_now(self, msg: Any) -> None:
        super().put_response(msg)

    def publish(self, channel: bytes, message: bytes) -> int:
        backend = self.tc_node.backend
        backend._local.dropped = backend._take_global_drop()
        try:
            return int(super().publish(channel, message))
        finally:
            backend._local.dropped = False


class _AsyncSocket(_SyncSocket, AsyncFakeSocket):
    pass


class _SyncConnection(fakeredis.FakeRedisConnection):
    """A fakeredis connection of one node (the class attribute ``node``, set per node)."""

    node: ClassVar[_Node]

    def _connect(self) -> _SyncSocket:
        self.node.refuse()
        if self.node.silent:  # a connection attempt into a black hole
            time.sleep(self.socket_connect_timeout or 0.0)
            raise redis.TimeoutError("Timeout connecting to server")
        return self.node.adopt(super()._connect(), _SyncSocket)

    def _broken(self) -> bool:
        sock = self._sock
        return sock is not None and (sock.tc_dead or self.node.cut)

    def can_read(self, timeout: float | None = 0) -> bool:
        if self._broken():
            return True  # read_response raises at once, as on a reset socket
        return bool(super().can_read(timeout))

    def read_response(self, **kwargs: Any) -> Any:  # type: ignore[override] # fakeredis's signature
        sock = self._sock
        if sock is not None and not self._broken() and not FakeSelector(sock).check_can_read(self.socket_timeout):
            # Held or delayed replies: time out as a socket would (fakeredis would wait forever).
            self._fail(redis.TimeoutError("Timeout reading from socket"))
        if self._broken():
            self._fail(_reset())
        return super().read_response(**kwargs)

    def _fail(self, error: Exception) -> NoReturn:
        self.disconnect()  # type: ignore[no-untyped-call]
        raise error


class _AsyncConnection(FakeAsyncRedisConnection):
    """The async twin of ``_SyncConnection``."""

    node: ClassVar[_Node]

    async def _connect(self) -> None:
        self.node.refuse()
        if self.node.silent:
            await asyncio.sleep(self.socket_connect_timeout or 0.0)
            raise redis.TimeoutError("Timeout connecting to server")
        await super()._connect()
        assert self._sock is not None  # made by fakeredis's _connect
        self.node.adopt(self._sock, _AsyncSocket)

    async def read_response(self, **kwargs: Any) -> Any:  # type: ignore[override] # fakeredis's signature
        sock = self._sock
        if isinstance(sock, _SyncSocket) and (sock.tc_dead or self.node.cut):
            await self.disconnect(nowait=True)
            raise _reset()
        if not self.node.silent or self.socket_timeout is None:
            return await super().read_response(**kwargs)
        try:  # a black hole: time out as a socket would (fakeredis would wait forever)
            return await asyncio.wait_for(super().read_response(**kwargs), self.socket_timeout)
        except asyncio.TimeoutError:
            await self.disconnect(nowait=True)
            raise redis.TimeoutError("Timeout reading from socket") from None


class MemoryRedis:
    """One in-memory Redis server (L2 and the pub/sub bus) and the caches wired to it.

    Each cache made by :meth:`cache` is a node, "a process". Faults apply to the caches'
    connections, never to :attr:`redis`, a plain client for the test to look at, seed or change
    Redis with. :meth:`down`/:meth:`up` and :meth:`partition`/:meth:`heal` make Redis
    unreachable for every cache or some (refused and reset, or ``silent=True``: a black hole,
    noticed by the timeouts and the subscribers' health check); :meth:`drop_messages`
    loses bus messages; :meth:`hold_messages`/:meth:`delay_messages` make what the server sends
    to the subscribers (messages and replies alike, in order, like a slow link) late, until
    :meth:`restore_messages`. ``down``, ``up``, ``partition`` and ``heal`` return once every
    affected cache has noticed (its subscriber lost, or subscribed again). See docs/testing.md.

    Args:
        version: the Redis version the server reports.
    """

    def __init__(self, *, version: tuple[int, ...] = (7, 4)) -> None:
        self.server: Any = fakeredis.FakeServer(version=version)
        """The fakeredis server. Clients made on it directly bypass the message faults."""
        self._down = ""  # "", "reset" or "silent"
        self._lock = threading.Lock()
        self._local = threading.local()
        self._all = _Node(self, "every node")  # faults set for every node (to=None)
        self._nodes: dict[TieredCache, _Node] = {}
        self._caches: list[TieredCache] = []
        self._queues: dict[_SyncSocket, collections.deque[tuple[float, Any]]] = {}
        self._wakeup = threading.Condition(self._lock)
        self._postman: threading.Thread | None = None
        self._closed = False
        self._counter = itertools.count(1)
        admin = _Node(self, "backend.redis", exempt=True)
        self.redis: redis.Redis = self._clients(admin, 5.0, 5.0)[0]
        """A client on the server that no fault touches: to inspect, seed or change Redis."""

    # -- caches -----------------------------------------------------------------------------

    def cache(self, **kwargs: Any) -> TieredCache:
        """A :class:`~tiercache.TieredCache` on this server (``kwargs`` as for it, without
        ``url``, ``client`` or ``async_client``), sync and async, its subscriber subscribed
        unless Redis is down or this is ``coherent=False``.

        Raises:
            ConfigError: ``url``, ``client`` or ``async_client`` was given.
            TimeoutError: the subscriber did not subscribe within 5 seconds.
        """
        for name in ("url", "client", "async_client"):
            if name in kwargs:
                raise ConfigError(f"MemoryRedis.cache({name}=...): the cache is wired to this backend; leave it out")
        if self._closed:
            raise ConfigError("MemoryRedis.cache(): this backend is closed; make a new MemoryRedis()")
        node = _Node(self, f"cache #{next(self._counter)} (namespace {kwargs.get('namespace', 'default')!r})")
        # The timeouts TieredCache gives the pools it makes from a URL (a black hole needs them).
        client, async_client = self._clients(
            node, kwargs.get("socket_timeout", 0.5), kwargs.get("connect_timeout", 0.5)
        )
        cache = TieredCache(client=client, async_client=async_client, **kwargs)
        self._nodes[cache] = node
        self._caches.append(cache)
        if not (node.cut or node.silent):
            self._await_bus([cache], connected=True, timeout=5.0)
        return cache

    def _clients(self, node: _Node, timeout: float, connect_timeout: float) -> tuple[redis.Redis, redis.asyncio.Redis]:
        """A sync and an async client of ``node``, failing at once as tiercache's own pools do."""
        common = {"server": self.server, "socket_timeout": timeout, "socket_connect_timeout": connect_timeout}
        sync_class = type("MemoryConnection", (_SyncConnection,), {"node": node})
        async_class = type("MemoryAsyncConnection", (_AsyncConnection,), {"node": node})
        sync_pool = redis.ConnectionPool(connection_class=sync_class, retry=Retry(NoBackoff(), 0), **common)
        async_pool = redis.asyncio.ConnectionPool(
            connection_class=async_class, retry=AsyncRetry(NoBackoff(), 0), **common
        )
        return redis.Redis(connection_pool=sync_pool), redis.asyncio.Redis(connection_pool=async_pool)

    def _node(self, cache: TieredCache) -> _Node:
        try:
            return self._nodes[cache]
        except KeyError:
            raise ConfigError(f"{cache!r} was not made by this MemoryRedis: use backend.cache(...)") from None

    def _targets(self, to: TieredCache | Iterable[TieredCache] | None) -> list[_Node]:
        if to is None:
            return [self._all]
        caches = [to] if isinstance(to, TieredCache) else list(to)
        return [self._node(c) for c in caches]

    # -- Redis away -------------------------------------------------------------------------

    def down(self, *, silent: bool = False, timeout: float = 5.0) -> None:
        """Take Redis away from every cache: connections are refused, the subscribers' reset
        (``silent``: a black hole, as a hung Redis or a dropped route; commands time out after
        ``socket_timeout``, and each subscriber gives up within its ``staleness_bound``).
        Returns once every subscriber has noticed."""
        self._fault(list(self._nodes.values()), silent, timeout, everyone=True)

    def up(self, timeout: float = 5.0) -> None:
        """Bring Redis back (data intact: it was unreachable, not restarted). Returns once
        every cache not partitioned is subscribed again (the subscriber reconnects after its
        backoff, at most about 2 s; a cache's circuit breaker may skip Redis for another
        ``breaker_cooldown``)."""
        self._down = ""
        self._release(list(self._nodes.values()))
        self._await_bus([c for c, n in self._nodes.items() if not n.partitioned], connected=True, timeout=timeout)

    @contextlib.contextmanager
    def outage(self, *, silent: bool = False, timeout: float = 5.0) -> Iterator[None]:
        """``down()`` for the block, then ``up()``."""
        self.down(silent=silent, timeout=timeout)
        try:
            yield
        finally:
            self.up(timeout)

    def partition(self, *caches: TieredCache, silent: bool = False, timeout: float = 5.0) -> None:
        """Cut these caches off Redis and the bus (as ``down()`` does), not the others."""
        self._fault([self._node(c) for c in caches], silent, timeout)

    def heal(self, *caches: TieredCache, timeout: float = 5.0) -> None:
        """End the partition of these caches (all, without arguments); returns once they are
        subscribed again (see ``up``)."""
        nodes = [self._node(c) for c in caches] if caches else list(self._nodes.values())
        for node in nodes:
            node.partitioned = ""
        self._release(nodes)
        healed = [c for c, n in self._nodes.items() if n in nodes and not (n.cut or n.silent)]
        self._await_bus(healed, connected=True, timeout=timeout)

    def _fault(self, nodes: list[_Node], silent: bool, timeout: float, everyone: bool = False) -> None:
        if everyone:
            self._down = "silent" if silent else "reset"
        else:
            for node in nodes:
                node.partitioned = "silent" if silent else "reset"
        if silent:
            self._await_bus([c for c, n in self._nodes.items() if n in nodes], connected=False, timeout=timeout)
        else:
            self._cut(nodes, timeout)

    def _release(self, nodes: list[_Node]) -> None:
        """The end of a black hole: what was sent meanwhile arrives, in order, both ways."""
        unsent: list[tuple[_SyncSocket, list[Any]]] = []
        with self._lock:
            for node in nodes:
                if node.silent:
                    continue
                for sock in list(node.sockets):
                    if sock.tc_unsent:
                        unsent.append((sock, sock.tc_unsent))
                        sock.tc_unsent = None
                    queue = self._queues.get(sock)
                    if queue and not (node.hold or self._all.hold):
                        now = time.monotonic()
                        self._queues[sock] = collections.deque((min(due, now), msg) for due, msg in queue)
            self._wakeup.notify_all()  # held replies and messages: see _route and _deliver_due
        for sock, chunks in unsent:
            for data in chunks:
                sock.tc_send_now(data)

    def _cut(self, nodes: list[_Node], timeout: float) -> None:
        with self.server.lock, self._lock:  # the server's lock first, as in PUBLISH
            for node in nodes:
                for sock in list(node.sockets):
                    self._queues.pop(sock, None)
                    if sock._pubsub and not sock.tc_dead:
                        # A subscriber's connection resets: Redis drops its subscription (PUBLISH
                        # no longer counts it), and the reader blocked on it wakes up to fail.
                        sock.tc_dead = True
                        for subscribers in (*self.server.subscribers.values(), *self.server.psubscribers.values()):
                            subscribers.discard(sock)
                        sock.tc_put_now(None)
        caches = [c for c, n in self._nodes.items() if n in nodes]
        self._await_bus(caches, connected=False, timeout=timeout)

    def _await_bus(self, caches: list[TieredCache], connected: bool, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for cache in caches:
            stats = cache.stats()
            if stats.bus_connected is None:
                continue  # no subscriber (coherent=False)
            while cache.ready(0) is not connected:
                if time.monotonic() >= deadline:
                    state = "subscribe again" if connected else "notice the fault"
                    name = self._nodes[cache].name
                    raise TimeoutError(f"tiercache.testing: the subscriber of {name} did not {state} in {timeout} s")
                time.sleep(0.002)

    # -- bus messages -----------------------------------------------------------------------

    def drop_messages(self, n: int | None = None, *, to: TieredCache | Iterable[TieredCache] | None = None) -> None:
        """Lose the next ``n`` bus messages (None: all, until :meth:`restore_messages`) on their
        way to the subscribers of ``to`` (a cache, several, or None: every cache). Redis still
        counts them as delivered (``WriteResult.receivers``), as it would a message lost in transit."""
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
            raise ConfigError(f"drop_messages(n={n!r}): pass a count >= 0, or None for every message")
        with self._lock:
            for node in self._targets(to):
                node.drop = _FOREVER if n is None else float(n)

    def hold_messages(self, *, to: TieredCache | Iterable[TieredCache] | None = None) -> None:
        """Keep what the server sends to the subscribers of ``to`` (None: every cache) until
        :meth:`restore_messages`: a link that stalls."""
        with self._lock:
            for node in self._targets(to):
                node.hold = True

    def delay_messages(self, seconds: float, *, to: TieredCache | Iterable[TieredCache] | None = None) -> None:
        """Deliver what the server sends to the subscribers of ``to`` (None: every cache)
        ``seconds`` late, in order: a slow link."""
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not 0 <= seconds < _FOREVER:
            raise ConfigError(f"delay_messages(seconds={seconds!r}): pass a finite number of seconds >= 0")
        with self._lock:
            for node in self._targets(to):
                node.delay = float(seconds)
            self._start_postman()

    def restore_messages(self) -> None:
        """Stop dropping, holding and delaying; what is held or delayed is delivered now, in order."""
        with self._lock:
            for node in [self._all, *self._nodes.values()]:
                node.drop, node.hold, node.delay = 0.0, False, 0.0
            for sock, queue in list(self._queues.items()):
                while queue and not sock.tc_node.silent:  # a black hole lasts until healed
                    sock.tc_put_now(queue.popleft()[1])
            self._wakeup.notify_all()

    def _take_global_drop(self) -> bool:
        """Whether the message being published is lost for everyone (counted once per PUBLISH)."""
        with self._lock:
            if self._all.drop > 0:
                self._all.drop -= 1
                return True
            return False

    def _route(self, sock: _SyncSocket, msg: Any) -> None:
        """Deliver ``msg`` from the server to ``sock`` now, later, or never."""
        node = sock.tc_node
        with self._lock:
            if sock.tc_dead or node.cut:
                return  # nobody is there to read it
            if node.exempt or not sock._pubsub:
                sock.tc_put_now(msg)
                return
            if isinstance(msg, list) and msg and msg[0] in _BUS_MESSAGES:
                if getattr(self._local, "dropped", False):
                    return
                if node.drop > 0:
                    node.drop -= 1
                    return
            queue = self._queues.get(sock)
            held = node.hold or self._all.hold or node.silent
            delay = max(node.delay, self._all.delay)
            if not held and not delay and not queue:
                sock.tc_put_now(msg)
                return
            if queue is None:
                queue = self._queues[sock] = collections.deque()
            due = _FOREVER if held else time.monotonic() + delay
            if queue and queue[-1][0] > due:
                due = queue[-1][0]  # in order, like a stream
            queue.append((due, msg))
            self._start_postman()
            self._wakeup.notify_all()

    def _start_postman(self) -> None:
        if self._postman is None or not self._postman.is_alive():
            self._postman = threading.Thread(target=self._deliver_due, name="tiercache-testing-postman", daemon=True)
            self._postman.start()

    def _deliver_due(self) -> None:
        """The delayed messages' thread: delivers each when its time comes (under the lock, so
        nothing overtakes it)."""
        with self._lock:
            while not self._closed:
                now = time.monotonic()
                next_due = _FOREVER
                for sock, queue in list(self._queues.items()):
                    while queue and queue[0][0] <= now:
                        sock.tc_put_now(queue.popleft()[1])
                    if queue:
                        next_due = min(next_due, queue[0][0])
                    else:
                        del self._queues[sock]
                self._wakeup.wait(None if next_due == _FOREVER else next_due - now)

    # -- closing ----------------------------------------------------------------------------

    def close(self) -> None:
        """Close every cache made here (sync pools; see :meth:`aclose` in async tests)."""
        with self._lock:
            self._closed = True
            self._queues.clear()
            self._wakeup.notify_all()
        for cache in self._caches:
            cache.close()
        self.redis.close()
        if self._postman is not None:
            self._postman.join(5)

    async def aclose(self) -> None:
        """``await cache.aclose()`` for every cache (their pools of the running loop), then ``close()``."""
        for cache in self._caches:
            await cache.aclose()
        self.close()

    def __enter__(self) -> MemoryRedis:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

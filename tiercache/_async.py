"""The async I/O driver: runs flows with ``redis.asyncio`` connections and asyncio futures.

redis.asyncio connections belong to the event loop that opened them, so pools are kept per
running loop (weakly, so a finished ``asyncio.run`` takes its pool with it): one cache
works across successive event loops.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import redis
import redis.asyncio
from redis.exceptions import NoScriptError

from ._flight import Flight
from ._remote import PoolBusy, RedisOp, RemoteFailure, failure, finish
from ._steps import CallWith, Flow, Reply, Spawn, Wait
from ._types import CALL
from .errors import ConfigError

R = TypeVar("R")

__all__ = ["AsyncRedis", "drive"]


class AsyncRedis:
    """Executes RedisOps on a ``redis.asyncio`` pool of the running event loop.

    Pools tiercache makes itself are plain ``ConnectionPool`` s bounded by an
    ``asyncio.Semaphore(pool_size)``: callers past the bound wait up to ``pool_timeout`` for a
    connection (redis-py's plain pool would raise MaxConnectionsError instead), and a
    connection is had without the ``BlockingConnectionPool``'s per-checkout timeout context
    and Condition, about 17 µs per round trip on the machine we measure on.
    """

    __slots__ = ("_batches", "_fixed", "_limit", "_lock", "_make_pool", "_pools", "_wait", "coalesce")

    def __init__(
        self,
        make_pool: Callable[[], redis.asyncio.ConnectionPool] | None = None,
        pool: redis.asyncio.ConnectionPool | None = None,
        limit: int = 64,
        wait: float = 1.0,
    ) -> None:
        self._make_pool = make_pool
        self._fixed = pool
        self._limit = limit
        self._wait = wait
        # Strong references: a loop that ended (asyncio.run returned) stays here until its
        # pool's sockets are closed by discard_closed(), instead of leaking them to the GC.
        self._pools: dict[asyncio.AbstractEventLoop, tuple[redis.asyncio.ConnectionPool, asyncio.Semaphore]] = {}
        self._lock = threading.Lock()
        #: Coalesce reads issued in the same event-loop iteration into one pipeline (see
        #: ``_coalesced``); set by the cache (``coalesce_reads``).
        self.coalesce = False
        self._batches: dict[asyncio.AbstractEventLoop, list[tuple[RedisOp, asyncio.Future[Any] | None]]] = {}

    def _pool(self) -> tuple[redis.asyncio.ConnectionPool, asyncio.Semaphore | None]:
        if self._fixed is not None:
            return self._fixed, None
        loop = asyncio.get_running_loop()
        entry = self._pools.get(loop)
        if entry is None:
            assert self._make_pool is not None
            self.discard_closed()
            with self._lock:
                entry = self._pools[loop] = (self._make_pool(), asyncio.Semaphore(self._limit))
        return entry

    def forget_pools(self) -> None:
        """After a fork: drop (without closing: the parent still uses those sockets) the pools."""
        self._lock = threading.Lock()
        _FORGOTTEN.append(self._pools)  # never collected, so never closed from the child
        self._pools = {}

    def discard_closed(self) -> None:
        """Close the sockets of pools whose event loop has closed (nothing can await them now)."""
        with self._lock:
            closed = [loop for loop in self._pools if loop.is_closed()]
            pools = [self._pools.pop(loop)[0] for loop in closed]
        for pool in pools:
            _close_sockets(pool)

    async def execute(self, op: RedisOp) -> Any:
        if self._fixed is None and self._make_pool is None:
            raise ConfigError(
                "async calls need async_client=redis.asyncio.Redis(...) here: the sync client= "
                "uses a connection class tiercache cannot mirror for asyncio"
            )
        if self.coalesce and op.coalesce:
            return await self._coalesced(op)
        return await self._execute_bounded(op)

    async def _coalesced(self, op: RedisOp) -> Any:
        """DataLoader-style batching: the first read of an event-loop iteration yields once,
        collecting the reads other tasks issue meanwhile, then sends them all in one pipeline
        on one connection and hands each task its reply (or its failure). Only quick reads
        (``RedisOp.coalesce``) are: no script (a NOSCRIPT reply mid-pipeline would need its
        own retry), no blocking command (it would hold up every read behind it).

        A read that joined a batch is sent whatever happens to its task, so a task cancelled
        meanwhile waits until the read has landed before the cancellation reaches its flow:
        the flow's clean-up (giving back the lease this very read may take) must run after
        it in Redis, never before, or the lease would be left to expire (issue 9, item 8)."""
        loop = asyncio.get_running_loop()
        batch = self._batches.get(loop)
        if batch is not None:
            future: asyncio.Future[Any] = loop.create_future()
            batch.append((op, future))
            try:
                return await asyncio.shield(future)
            except asyncio.CancelledError:
                await _landed(future, self._landing_limit())
                raise
        batch = self._batches[loop] = [(op, None)]
        try:
            await asyncio.sleep(0)
        except BaseException:
            # Cancelled before sending: the others' reads still go, on a task of their own.
            if self._batches.get(loop) is batch:
                del self._batches[loop]
            if len(batch) > 1:
                _spawn_quietly(loop, self._execute_batch(batch[1:]))
            raise
        if self._batches.get(loop) is batch:
            del self._batches[loop]
        if len(batch) == 1:
            return await self._execute_bounded(op)
        # On a task of its own: cancelling this caller must not cut the others' reads short
        # (and fail them, opening the breaker, with their leases taken but unknown).
        task = loop.create_task(self._execute_batch(batch))
        _TASKS.add(task)
        task.add_done_callback(_finished)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            await _landed(task, self._landing_limit())
            raise

    async def _execute_batch(  # noqa: C901, PLR0912, PLR0915 - the async L2 hot path: one pipeline round trip, no extra awaits
        self, batch: list[tuple[RedisOp, asyncio.Future[Any] | None]]
    ) -> Any:
        mine: Any = None
        own_error: RemoteFailure | None = None
        try:
            pool, bound = self._pool()
            if bound is not None:
                await self._acquire(bound)
            try:
                conn = await pool.get_connection()  # type: ignore[no-untyped-call]
            except Exception as exc:
                if bound is not None:
                    bound.release()
                raise failure(exc) from exc
            try:
                commands = [c for op, _ in batch for c in (op.args, *op.more)]
                await conn.send_packed_command(conn.pack_commands(commands))
                for op, future in batch:
                    replies = []
                    error: RemoteFailure | None = None
                    for _ in range(1 + len(op.more)):
                        try:
                            replies.append(await conn.read_response())
                        except redis.ResponseError as exc:  # this command failed, the rest stand
                            error = failure(exc)
                    outcome: Any = None
                    if error is None:
                        try:
                            outcome = finish(op, replies if op.more else replies[0])
                        except RemoteFailure as exc:  # unreadable
                            error = exc
                    if future is None:
                        if error is not None:
                            own_error = error
                        else:
                            mine = outcome
                    elif not future.done():
                        if error is not None:
                            future.set_exception(error)
                        else:
                            future.set_result(outcome)
            except BaseException:
                await _quietly(conn.disconnect(nowait=True))
                await _quietly(pool.release(conn))
                raise
            else:
                await pool.release(conn)
            finally:
                if bound is not None:
                    bound.release()
        except BaseException as exc:
            # The connection failed (or we were cancelled): every read of the batch fails open.
            for _, future in batch:
                if future is not None and not future.done():
                    future.set_exception(failure(exc))  # one each; PoolBusy stays PoolBusy
            if isinstance(exc, Exception) and not isinstance(exc, RemoteFailure):
                raise failure(exc) from exc
            raise
        if own_error is not None:
            raise own_error
        return mine

    def _landing_limit(self) -> float:
        """The longest a cancelled task waits for its read to land (see ``_coalesced``): the
        pool's socket timeout (5 s if it has none) plus ``pool_timeout``, so a hung Redis
        cannot make a task uncancellable."""
        timeout = None
        try:
            timeout = self._pool()[0].connection_kwargs.get("socket_timeout")
        except Exception:  # noqa: BLE001, S110 - no pool to ask: the default
            pass
        return (float(timeout) if timeout else 5.0) + self._wait

    async def _acquire(self, bound: asyncio.Semaphore) -> None:
        """A slot of the pool, waiting at most ``pool_timeout`` (then PoolBusy: fail open)."""
        if bound.locked():
            try:
                await asyncio.wait_for(bound.acquire(), self._wait)
            except asyncio.TimeoutError:
                busy = redis.ConnectionError(f"no connection free within pool_timeout={self._wait} s")
                raise PoolBusy() from busy
        else:
            await bound.acquire()

    async def _execute_bounded(self, op: RedisOp) -> Any:
        pool, bound = self._pool()
        if bound is not None:
            await self._acquire(bound)
        try:
            return await self._execute(pool, op)
        finally:
            if bound is not None:
                bound.release()

    async def _execute(self, pool: redis.asyncio.ConnectionPool, op: RedisOp) -> Any:
        cancelling: Callable[[], int] | None = getattr(asyncio.current_task(), "cancelling", None)  # 3.11+
        cancels = 0 if cancelling is None else cancelling()
        try:
            conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        except Exception as exc:  # whatever the client raises, the flow fails open
            raise failure(exc) from exc
        owed = 0  # replies Redis owes us for what we sent
        try:
            try:
                if op.more:
                    owed = 1 + len(op.more)
                    await conn.send_packed_command(conn.pack_commands([op.args, *op.more]))
                    reply: Any = []
                    while owed:
                        reply.append(await conn.read_response(disconnect_on_error=False))
                        owed -= 1
                else:
                    owed = 1
                    await conn.send_command(*op.args)
                    reply = await conn.read_response(disconnect_on_error=False)
                    owed = 0
            except NoScriptError:
                owed = 1
                await conn.send_command(*op.fallback_args())
                reply = await conn.read_response(disconnect_on_error=False)
                owed = 0
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError) and owed:
                # Cancelled with the command sent: it runs in Redis anyway, so let its reply
                # land before the cancellation reaches the flow, whose clean-up (giving back
                # a lease this command may take) must come after it (issue 9, item 8).
                await _see_through(conn, owed, self._landing_limit())
            # Cancelled or failed mid-command: a reply may still arrive, so drop the socket
            # without awaiting (we may be cancelled again while awaiting).
            await _quietly(conn.disconnect(nowait=True))
            await _quietly(pool.release(conn))
            if isinstance(exc, Exception):
                raise failure(exc) from exc
            raise
        await pool.release(conn)
        if cancelling is not None and cancelling() > cancels:
            # A cancellation redis-py swallowed (its send runs in asyncio.wait_for, which on
            # Python 3.11 loses a cancellation that races the send's end): the task would run
            # on as if never cancelled. Deliver it now, after the reply landed.
            raise asyncio.CancelledError()
        return finish(op, reply)

    async def aclose(self) -> None:
        """Disconnect the pool of the running loop, and close what finished loops left."""
        if self._fixed is not None:
            await self._fixed.disconnect()
            return
        with self._lock:
            entry = self._pools.pop(asyncio.get_running_loop(), None)
        if entry is not None:
            pool = entry[0]
            await pool.disconnect()
        self.discard_closed()


def _close_sockets(pool: redis.asyncio.ConnectionPool) -> None:
    """Close a dead loop's connections without that loop (whose transports cannot run)."""
    conns = [*getattr(pool, "_available_connections", ()), *getattr(pool, "_in_use_connections", ())]
    for conn in conns:
        writer = getattr(conn, "_writer", None)
        transport = getattr(writer, "transport", None)
        sock = getattr(transport, "_sock", None)
        try:
            if sock is not None:
                sock.close()
                transport._sock = None  # type: ignore[union-attr]
                transport._closing = True  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001, S110 - best effort on sockets nobody can use any more
            pass
        conn._reader = conn._writer = None


_FORGOTTEN: list[Any] = []


def _spawn_quietly(loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, Any]) -> None:
    task = loop.create_task(coroutine)
    _TASKS.add(task)
    task.add_done_callback(_finished)


async def _landed(future: asyncio.Future[Any], limit: float) -> None:
    """Wait until ``future`` is done (a read that will land: it was sent, or is about to be,
    on a task of its own), through any number of cancellations, for at most ``limit``
    seconds; its outcome is not ours."""
    deadline = time.monotonic() + limit
    while not future.done() and (left := deadline - time.monotonic()) > 0:
        try:
            await asyncio.wait((future,), timeout=left)
        except asyncio.CancelledError:
            continue


async def _see_through(conn: Any, owed: int, limit: float) -> None:
    """Read the ``owed`` replies of a command whose caller was cancelled, through further
    cancellations, for at most ``limit`` seconds; any failure ends it (the caller drops the
    connection: the command's fate is then unknown, as with any failed read)."""
    deadline = time.monotonic() + limit
    while owed and (left := deadline - time.monotonic()) > 0:
        try:
            await asyncio.wait_for(conn.read_response(disconnect_on_error=False), left)
        except asyncio.CancelledError:
            continue
        except redis.ResponseError:
            pass
        except Exception:  # noqa: BLE001 - the connection failed or timed out: give up
            return
        owed -= 1


async def _quietly(awaitable: Awaitable[Any]) -> None:
    try:
        await awaitable
    except Exception:  # noqa: BLE001, S110 - best effort on a connection we are discarding
        pass


async def wait(flight: Flight, timeout: float | None = None) -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    home = threading.get_ident()

    def wake() -> None:
        if threading.get_ident() == home:  # the loop's own thread (the leader was a task):
            _resolve(done)  # no self-pipe write, which costs a syscall per waiter
            return
        try:
            loop.call_soon_threadsafe(_resolve, done)
        except RuntimeError:  # that loop has closed: nobody is waiting there any more
            pass

    if flight.add_waiter(wake):
        if timeout is None:
            await done
        else:
            try:
                await asyncio.wait_for(done, timeout)
            except asyncio.TimeoutError:
                pass


#: Detached loads and refreshes ahead of expiry running as tasks: the event loop keeps only
#: weak references to tasks, so without these they could be collected mid-flight.
_TASKS: set[asyncio.Task[Any]] = set()


def spawn(step: Spawn, remote: AsyncRedis | None, call: Callable[[], Awaitable[Any]] | None) -> None:
    """Run ``step.flow`` as a task on the running loop; a hard timeout may cancel it."""
    loop = asyncio.get_running_loop()
    task = loop.create_task(drive(step.flow, remote, call))
    _TASKS.add(task)
    task.add_done_callback(_finished)
    step.flight.cancel = lambda: loop.call_soon_threadsafe(task.cancel)  # any thread may time out


def _finished(task: asyncio.Task[Any]) -> None:
    _TASKS.discard(task)
    if not task.cancelled():
        task.exception()  # the flow handed its outcome to its flight already: mark it seen


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def drive(flow: Flow[R], remote: AsyncRedis | None, call: Callable[..., Awaitable[Any]] | None) -> R:
    """Run ``flow`` to its end, awaiting each step it yields, and return what it returns."""
    return await _drive(flow, remote, call, None)


async def _drive(
    flow: Flow[R], remote: AsyncRedis | None, call: Callable[..., Awaitable[Any]] | None, error: BaseException | None
) -> R:
    reply: Reply = None
    while True:
        try:
            step = flow.throw(error) if error is not None else flow.send(reply)
        except StopIteration as stop:
            result: R = stop.value
            return result
        error = reply = None
        try:
            if step is CALL:
                reply = await call()  # type: ignore[misc]
            elif type(step) is CallWith:
                reply = await call(step.arg)  # type: ignore[misc]
            elif type(step) is Wait:
                await wait(step.flight, step.timeout)
            elif type(step) is Spawn:
                spawn(step, remote, call)
            else:
                reply = await remote.execute(step)  # type: ignore[union-attr]
        except RemoteFailure as failure:  # a reply like any other: the flow settles it
            reply = failure
        except GeneratorExit:
            # This coroutine is being closed (``coro.close()``, or collected mid-await): it may
            # not await again, and a flow thrown GeneratorExit could not yield its clean-up
            # (giving its lease back). So the flow is finished as a cancelled one on a task.
            _finish_closed(flow, remote, call)
            raise
        except BaseException as exc:  # noqa: BLE001 - thrown into the flow, which decides
            error = exc


def _finish_closed(flow: Flow[Any], remote: AsyncRedis | None, call: Callable[..., Awaitable[Any]] | None) -> None:
    """Run the clean-up of a flow whose coroutine was closed: as if cancelled, on a task of the
    running loop; with no loop running, close it (its lease then expires by itself)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    if loop is None or loop.is_closed():
        try:
            flow.close()
        except RuntimeError:  # it tried to yield a clean-up step: nothing can run it now
            pass
        return
    _spawn_quietly(loop, _quietly(_drive(flow, remote, call, asyncio.CancelledError())))

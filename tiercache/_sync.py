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
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import redis
from redis.exceptions import NoScriptError

from ._flight import ELSEWHERE, Flight
from ._remote import RedisOp, RemoteFailure, failure, finish
from ._steps import CallWith, Flow, Reply, Spawn, Wait
from ._types import CALL

R = TypeVar("R")

__all__ = ["SyncRedis", "drive"]


class SyncRedis:
    """Executes RedisOps on a redis-py connection pool."""

    __slots__ = ("pool",)

    def __init__(self, pool: redis.ConnectionPool) -> None:
        self.pool = pool

    def execute(self, op: RedisOp) -> Any:
        try:
            conn = self.pool.get_connection()
        except Exception as exc:  # whatever the client raises, the flow fails open
            raise failure(exc) from exc
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
                raise failure(exc) from exc
            raise  # KeyboardInterrupt, SystemExit: not a Redis failure
        self.pool.release(conn)
        return finish(op, reply)

    def close(self) -> None:
        self.pool.disconnect()


def wait(flight: Flight, timeout: float | None = None) -> bool:
    """Block until ``flight`` ends or ``timeout`` passed; False, at once, when blocking this
    thread would keep it from ever ending (then the flow loads without waiting):

    - its leader is this thread: an outer frame (a loader that reads its own key) or, for
      an async leader, this thread's event loop, which a sync call made from a coroutine
      blocks (issue 9, items 6 and 7);
    - it waits for a lease held by a load of this process (``ELSEWHERE``) while this thread
      runs an event loop: the holder may be a load of this very loop (its flight detached by
      a flush), which cannot fill while the loop is blocked. A lease another process holds
      is waited for as anywhere else (single-flight across processes holds for sync calls
      made from coroutines too)."""
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

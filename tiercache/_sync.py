"""The sync I/O driver: runs flows with redis-py's blocking connections and threading.

Commands go straight to a pooled connection (send, read, release): redis-py's
``execute_command`` would add its own retry loop (about ten attempts with backoff by default)
and ~10 µs of overhead per call; tiercache fails open instead, and the breaker in the flow
decides when to try Redis again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import redis
from redis.exceptions import NoScriptError

from ._flight import Flight
from ._flow import CALL, Flow, Wait
from ._remote import RedisOp, RemoteFailure

__all__ = ["SyncRedis", "drive"]


class SyncRedis:
    """Executes RedisOps on a redis-py connection pool."""

    __slots__ = ("pool",)

    def __init__(self, pool: redis.ConnectionPool) -> None:
        self.pool = pool

    def execute(self, op: RedisOp) -> Any:
        try:
            conn = self.pool.get_connection()
        except (redis.RedisError, OSError) as exc:
            raise RemoteFailure() from exc
        try:
            try:
                conn.send_command(*op.args)  # type: ignore[no-untyped-call]
                reply = conn.read_response()
            except NoScriptError:
                conn.send_command(*op.fallback_args())  # type: ignore[no-untyped-call]
                reply = conn.read_response()
        except BaseException as exc:
            conn.disconnect()  # type: ignore[no-untyped-call] # a reply may still be on its way: never reuse this socket
            self.pool.release(conn)
            if isinstance(exc, (redis.RedisError, OSError)):
                raise RemoteFailure() from exc
            raise
        self.pool.release(conn)
        return reply if op.parse is None else op.parse(reply)

    def close(self) -> None:
        self.pool.disconnect()


def wait(flight: Flight) -> None:
    done = threading.Event()
    if flight.add_waiter(done.set):
        done.wait()


def drive(flow: Flow, remote: SyncRedis | None, call: Callable[[], Any] | None) -> Any:
    """Run ``flow`` to its end, doing each step it yields, and return what it returns."""
    reply: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = flow.throw(error) if error is not None else flow.send(reply)
        except StopIteration as stop:
            return stop.value
        error = reply = None
        try:
            if step is CALL:
                reply = call()  # type: ignore[misc]
            elif type(step) is Wait:
                wait(step.flight)
            else:
                reply = remote.execute(step)  # type: ignore[union-attr]
        except BaseException as exc:  # noqa: BLE001 - thrown into the flow, which decides
            error = exc

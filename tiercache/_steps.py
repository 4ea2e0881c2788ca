"""The step protocol between the sans-I/O flows and the two drivers (``_sync``, ``_async``).

A flow is a generator: it yields a :data:`Step` (what it needs done) and is sent the
:data:`Reply` (the outcome), or has the exception thrown in; what it returns is the call's
answer. ``Flow[R]`` is a flow that returns an ``R``.

What a flow yields, and what the driver sends back:

- a :class:`~tiercache._remote.RedisOp`: the parsed reply, or a ``RemoteFailure`` *as the
  reply* (not thrown), which the flow settles (``Core.settle``);
- :data:`CALL`: the user's function's result (its exception is thrown in);
- :class:`CallWith`: the batch function's result for ``arg`` (or its exception);
- :class:`Wait`: False when refused (a wait only this very thread could end), else None/True;
- :class:`Spawn`: None, at once (``flow`` runs in the background).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, Literal, TypeAlias, TypeVar, final

from ._flight import Flight
from ._remote import RedisOp
from ._types import CALL, Sentinel

__all__ = ["CALL", "CallWith", "Flow", "Reply", "Spawn", "Step", "Wait"]

R = TypeVar("R")


@final
class CallWith:
    """Yielded by a batch flow to have the driver call the function with ``arg`` (the items
    that missed both tiers) and send back its result."""

    __slots__ = ("arg",)

    def __init__(self, arg: list[Any]) -> None:
        self.arg = arg


@final
class Wait:
    """Yielded by a flow to have the driver block (or await) until ``flight`` ends, or until
    ``timeout`` seconds passed (None: no limit). The flow then looks at ``flight.done``."""

    __slots__ = ("flight", "timeout")

    def __init__(self, flight: Flight, timeout: float | None = None) -> None:
        self.flight = flight
        self.timeout = timeout


@final
class Spawn:
    """Yielded by a flow to have the driver run another flow in the background (a worker
    thread, or a task on the running loop), with the same function to call, and go on at
    once. The driver sets ``flight.cancel`` when it can stop the background flow."""

    __slots__ = ("flight", "flow")

    def __init__(self, flow: Flow[Any], flight: Flight) -> None:
        self.flow = flow
        self.flight = flight


#: What a flow yields.
Step: TypeAlias = RedisOp | Literal[Sentinel.CALL] | CallWith | Wait | Spawn
#: What a driver sends back: a Redis reply (or a ``RemoteFailure``), the function's result,
#: or a wait's outcome. The flow settles it (``Core.settle``) or inspects it; never ``Any``.
Reply: TypeAlias = object
#: A sans-I/O flow returning an ``R``.
Flow: TypeAlias = Generator[Step, Reply, R]

"""Small shared types: the MISSING sentinel and the protocols the pure core depends on."""

from __future__ import annotations

import enum
import os
import random
from typing import Any, Protocol, runtime_checkable

#: tiercache's own random numbers (jitter, XFetch draws): never the global ``random`` state,
#: which belongs to the application (and its tests); reseeded in a forked child.
RNG = random.Random()  # noqa: S311 - jitter, not secrets
os.register_at_fork(after_in_child=RNG.seed)

__all__ = ["MISSING", "RNG", "Clock", "Missing", "Serializer"]


class Missing(enum.Enum):
    """Type of :data:`MISSING`: "no value" where ``None`` is a legitimate cached value."""

    MISSING = enum.auto()

    def __repr__(self) -> str:
        return "MISSING"


MISSING = Missing.MISSING


class Clock(Protocol):
    """A monotonic clock in seconds (``time.monotonic``); injected so TTL tests never sleep."""

    def __call__(self) -> float: ...


@runtime_checkable
class Serializer(Protocol):
    """Turns values into bytes and back.

    ``ident`` is stored in every envelope header (one byte): 1 to 15 are reserved for the
    built-in serializers, custom ones use 16 to 255. ``requires_signature`` makes the codec
    refuse unsigned payloads for this serializer (pickle sets it: unsigned pickle from Redis
    would be code execution).
    """

    ident: int
    name: str
    requires_signature: bool

    def dumps(self, value: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...

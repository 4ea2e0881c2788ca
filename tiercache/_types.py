"""Small shared types: the sentinels (MISSING; the flows' CALL, FAILED...) and the protocols
the pure core depends on."""

from __future__ import annotations

import enum
import os
import random
from typing import Any, Final, Protocol, runtime_checkable

#: tiercache's own random numbers (jitter, XFetch draws): never the global ``random`` state,
#: which belongs to the application (and its tests); reseeded in a forked child.
RNG = random.Random()  # noqa: S311 - jitter, not secrets
os.register_at_fork(after_in_child=RNG.seed)

__all__ = ["CALL", "FAILED", "MISSING", "RETRY", "RNG", "SKIPPED", "SOLO", "Clock", "Missing", "Sentinel", "Serializer"]


class Missing(enum.Enum):
    """Type of :data:`MISSING`: "no value" where ``None`` is a legitimate cached value."""

    MISSING = enum.auto()

    def __repr__(self) -> str:
        return "MISSING"


MISSING = Missing.MISSING


class Sentinel(enum.Enum):
    """The flows' own markers (never a user's value), one enum so mypy narrows each with ``is``."""

    #: Yielded by a flow to have the driver call the user's function and send back its result.
    CALL = enum.auto()
    #: What a Redis step settles to when Redis failed (fail-open; strict mode raises instead).
    FAILED = enum.auto()
    #: Sent for a Redis step not sent (no Redis configured, or the breaker is open).
    SKIPPED = enum.auto()
    #: A joined load ended without an answer (cancelled leader, a ``cache.get`` that found
    #: nothing): lead or join again.
    RETRY = enum.auto()
    #: The caller must not wait for this flight: it would wait for itself (load it alone).
    SOLO = enum.auto()

    def __repr__(self) -> str:
        return self.name


CALL: Final = Sentinel.CALL
FAILED: Final = Sentinel.FAILED
SKIPPED: Final = Sentinel.SKIPPED
RETRY: Final = Sentinel.RETRY
SOLO: Final = Sentinel.SOLO


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

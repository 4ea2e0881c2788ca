"""The argument checks of ``TieredCache``, ``tiered``, ``tiered_batch`` and the cache's
methods, one function per kind of check. Each raises :class:`ConfigError` naming the argument
(``name=value``) and saying what it must be. The checked arguments are passed by keyword, so
the name in the message is the caller's: ``seconds(ttl=ttl, lease_ttl=lease_ttl)``."""

from __future__ import annotations

import math
from typing import Any, TypeGuard

from ._types import Serializer
from .errors import ConfigError

__all__ = [
    "count",
    "decorated",
    "exception_types",
    "fraction",
    "function",
    "instance",
    "less_than",
    "names",
    "non_negative",
    "not_both",
    "seconds",
    "serializer",
]


def seconds(*, zero: bool = False, optional: bool = False, **values: object) -> None:
    """Durations: finite numbers (not bools) above 0, or at least 0 with ``zero``; None
    passes with ``optional``."""
    for name, value in values.items():
        if value is None and optional:
            continue
        if not (_finite(value) and (value > 0 or (zero and value == 0))):
            bound = ">= 0" if zero else "> 0"
            or_none = " or None" if optional else ""
            raise ConfigError(f"{name}={value!r} must be a finite number of seconds {bound}{or_none}")


def non_negative(**values: object) -> None:
    """Factors (not durations): finite numbers (not bools) of at least 0, 0 meaning off."""
    for name, value in values.items():
        if not (_finite(value) and value >= 0):
            raise ConfigError(f"{name}={value!r} must be a finite number >= 0 (0: off)")


def count(*, minimum: int, optional: bool = False, hint: str = "", **values: object) -> None:
    """Counts: ints (not bools) of at least ``minimum``; None passes with ``optional``."""
    for name, value in values.items():
        if value is None and optional:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ConfigError(f"{name}={value!r} must be an int >= {minimum}{' or None' if optional else ''}{hint}")


def fraction(**values: object) -> None:
    """Fractions in [0, 1)."""
    for name, value in values.items():
        if not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ConfigError(f"{name}={value!r} must be a fraction in [0, 1), e.g. 0.1")


def less_than(name: str, value: float | None, bound_name: str, bound: float | None, why: str = "") -> None:
    """``value`` below ``bound`` when both are given (each already checked on its own)."""
    if value is not None and bound is not None and value >= bound:
        raise ConfigError(f"{name}={value} must be less than {bound_name}={bound}{why}")


def exception_types(**values: object) -> None:
    """Tuples of exception classes."""
    for name, value in values.items():
        if not isinstance(value, tuple) or not all(isinstance(t, type) and issubclass(t, BaseException) for t in value):
            raise ConfigError(f"{name}={value!r} must be a tuple of exception classes, e.g. (LookupError,)")


def function(what: str, **values: object) -> None:
    """Callables (``what`` says which: ``"of the call's arguments returning the tenant"``), or None."""
    for name, value in values.items():
        if value is not None and not callable(value):
            raise ConfigError(f"{name}={value!r} must be a function {what}")


def names(**values: object) -> None:
    """Lists of names or functions returning them; a bare str (a list of characters) is refused."""
    for name, value in values.items():
        if isinstance(value, str):
            raise ConfigError(f"{name}={value!r} must be a list of names (e.g. {name}=[{value!r}]) or a function")


def instance(where: str, value: object, cls: type[Any]) -> None:
    """``where`` (``"tiered(cache=...)"``) needs an instance of ``cls``."""
    if not isinstance(value, cls):
        raise ConfigError(f"{where} needs a {cls.__name__}, got {value!r}")


def not_both(**values: object) -> None:
    """At most one of these alternatives is given (not None)."""
    given = [name for name, value in values.items() if value is not None]
    if len(given) > 1:
        raise ConfigError(f"pass either {' or '.join(n + '=' for n in values)}, not both")


def serializer(value: object) -> None:
    """A :class:`~tiercache.Serializer` (an object with the protocol's attributes), or None."""
    if value is not None and not isinstance(value, Serializer):
        raise ConfigError(
            f"serializer={value!r} lacks ident/name/requires_signature/dumps/loads: pass an object "
            "with them (the tiercache.Serializer protocol), or None for the default msgpack"
        )


def decorated(where: str, fn: object) -> None:
    """What a decorator (``where``: ``"@tiered"``) is applied to must be callable."""
    if not callable(fn):
        raise ConfigError(f"{where} needs a function, got {fn!r}: put it above a def (or a staticmethod/classmethod)")


def _finite(value: object) -> TypeGuard[float]:
    """A finite int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

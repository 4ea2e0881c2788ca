"""The types of decorated functions: :class:`TieredFunction` (sync) and
:class:`AsyncTieredFunction`, typing Protocols generic in the function's parameters and
result (``tiered``'s overloads return them; ``tests/typing`` checks them with assert_type)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar, overload

from ._cache import TieredCache
from ._coherence import WriteResult

__all__ = ["AsyncTieredFunction", "TieredFunction"]

P = ParamSpec("P")
R = TypeVar("R")
_P2 = ParamSpec("_P2")
_S = TypeVar("_S")


class TieredFunction(Protocol[P, R]):
    """What ``@tiered`` makes of a sync function: call it as the function; it also has helpers.

    Example:
        >>> cache = TieredCache(namespace="docs")
        >>> @tiered(cache, ttl=60)
        ... def square(x: int) -> int:
        ...     return x * x
        >>> square(4), square(4), square.__wrapped__(5)
        (16, 16, 25)
        >>> _ = square.invalidate(4)
        >>> square.key(4) == square.key(x=4)
        True
    """

    __wrapped__: Callable[P, R]
    cache: TieredCache

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R: ...

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> WriteResult:
        """Drop this call's entry from Redis and from the L1 of every process.

        To wait until every process has dropped it: ``cache.invalidate(f.key(...), wait=True)``."""
        ...

    def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call the function now, store the result in both tiers (telling every process), return it."""
        ...

    def key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The Redis key this call uses. With tags or a tenant, it depends on their current
        versions, which may take a round trip to Redis to read."""
        ...

    @overload
    def __get__(self, instance: None, owner: type[Any] | None = None) -> TieredFunction[P, R]: ...

    @overload
    def __get__(
        self: TieredFunction[Concatenate[_S, _P2], R], instance: _S, owner: type[Any] | None = None
    ) -> TieredFunction[_P2, R]: ...

    def __get__(self, instance: Any, owner: type[Any] | None = None) -> Any: ...


class AsyncTieredFunction(Protocol[P, R]):
    """What ``@tiered`` makes of an ``async def``: ``await f(...)``, ``await f.invalidate(...)``,
    ``await f.refresh(...)``, ``await f.akey(...)`` (``f.key(...)`` is plain, and may block on
    Redis for a function with tags or a tenant)."""

    __wrapped__: Callable[P, Coroutine[Any, Any, R]]
    cache: TieredCache

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R: ...

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> WriteResult:
        """Drop this call's entry from Redis and from the L1 of every process."""
        ...

    async def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call the function now, store the result in both tiers (telling every process), return it."""
        ...

    def key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The Redis key this call uses. With tags or a tenant, reading their versions may take
        a blocking round trip to Redis: in async code, use ``await f.akey(...)``."""
        ...

    async def akey(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The Redis key this call uses, the versions of its tags and tenant read on the event
        loop (without blocking it)."""
        ...

    @overload
    def __get__(self, instance: None, owner: type[Any] | None = None) -> AsyncTieredFunction[P, R]: ...

    @overload
    def __get__(
        self: AsyncTieredFunction[Concatenate[_S, _P2], R], instance: _S, owner: type[Any] | None = None
    ) -> AsyncTieredFunction[_P2, R]: ...

    def __get__(self, instance: Any, owner: type[Any] | None = None) -> Any: ...

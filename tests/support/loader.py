"""The body of a cached function in a test: counts its calls and plays scripted outcomes, as a
plain function or an ``async def``."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any


class Boom(Exception):
    """An exception a test's function raises."""


class AsyncOnly:
    """What :class:`Loader` needs of the ``mode`` fixture, for scenarios that only exist in asyncio."""

    is_async = True


class SyncOnly:
    """What :class:`Loader` needs of the ``mode`` fixture, for plain functions."""

    is_async = False


class Pause:
    """An outcome: hold the call until ``until`` lets it go (a Gate or a Mark), or for
    ``seconds``, then go on with ``then`` (any other outcome)."""

    def __init__(self, then: Any, until: Any = None, seconds: float = 0.0) -> None:
        self.then, self.until, self.seconds = then, until, seconds


class Loader:
    """A cached function's body whose calls play ``outcomes`` in order (the last one repeats):
    a value is returned, an exception raised, a callable called with the call's arguments (its
    result returned), a :class:`Pause` held first. With no outcomes a call returns its first
    argument.

    ``fn()`` is the body as a plain function, or an ``async def`` when ``mode.is_async``; each
    loader's function has a name of its own (so its own keys). ``calls`` counts the calls,
    ``results`` lists what each returned or raised; ``returned`` is set once a paused call
    goes on, ``cancelled`` once a paused async call is cancelled."""

    _names = itertools.count(1)

    def __init__(self, mode: Any = SyncOnly, *outcomes: Any) -> None:
        self.mode = mode
        self.outcomes = list(outcomes)
        self.name = f"loader{next(self._names)}"
        self.calls = 0
        self.results: list[Any] = []
        self.returned = threading.Event()
        self.cancelled = threading.Event()
        self._lock = threading.Lock()

    def _take(self) -> Any:
        with self._lock:
            self.calls += 1
            if not self.outcomes:
                return None
            return self.outcomes[min(self.calls, len(self.outcomes)) - 1]

    def _play(self, outcome: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if outcome is None and not self.outcomes:
            outcome = args[0] if args else None
        elif callable(outcome) and not isinstance(outcome, BaseException):
            outcome = outcome(*args, **kwargs)
        self.results.append(outcome)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """One call of the body, as a plain function."""
        outcome = self._take()
        if isinstance(outcome, Pause):
            if outcome.until is not None:
                outcome.until.block()
            if outcome.seconds:
                time.sleep(outcome.seconds)
            self.returned.set()
            outcome = outcome.then
        return self._play(outcome, args, kwargs)

    async def acall(self, *args: Any, **kwargs: Any) -> Any:
        """One call of the body, as an ``async def``."""
        outcome = self._take()
        if isinstance(outcome, Pause):
            try:
                if outcome.until is not None:
                    await outcome.until.ablock()
                if outcome.seconds:
                    await asyncio.sleep(outcome.seconds)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
            self.returned.set()
            outcome = outcome.then
        return self._play(outcome, args, kwargs)

    def fn(self, mode: Any = None) -> Callable[..., Any]:
        """The body in the flavour of ``mode`` (default: the loader's), named after the loader."""
        if (mode or self.mode).is_async:

            async def aload(*args: Any, **kwargs: Any) -> Any:
                return await self.acall(*args, **kwargs)

            aload.__name__ = aload.__qualname__ = self.name
            return aload

        def load(*args: Any, **kwargs: Any) -> Any:
            return self(*args, **kwargs)

        load.__name__ = load.__qualname__ = self.name
        return load


class Embedder:
    """A batch function's body (``@tiered_batch``): records each batch it is given; results name
    model and item (or are ``result(item, model)``); ``fail`` makes the next batches raise it."""

    def __init__(self, result: Callable[[Any, str], Any] | None = None) -> None:
        self.batches: list[list[Any]] = []
        self.result = result or (lambda item, model: f"{model}:{item!r}")
        self.fail: BaseException | None = None
        self.during: Callable[[], Any] | None = None

    def compute(self, items: list[Any], model: str) -> list[Any]:
        self.batches.append(list(items))
        if self.fail is not None:
            raise self.fail
        return [self.result(item, model) for item in items]

    def function(self, mode: Any) -> Callable[..., Any]:
        """``embed(items, model="m1")``, sync or async as ``mode`` says."""
        if mode.is_async:

            async def embed(items: list[Any], model: str = "m1") -> list[Any]:
                await asyncio.sleep(0)
                if self.during is not None:
                    await self.during()
                return self.compute(items, model)

            return embed

        def embed(items: list[Any], model: str = "m1") -> list[Any]:  # type: ignore[no-redef]
            if self.during is not None:
                self.during()
            return self.compute(items, model)

        return embed

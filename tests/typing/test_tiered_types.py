"""What a type checker sees of ``@tiered``: checked by ``mypy --strict tests/typing`` (.ci/run),
and run by pytest too (``assert_type`` returns its argument at run time), on an L1-only cache.

Each test pins one overload of ``tiered`` (sync function, ``async def``, method, staticmethod,
classmethod): what a call returns, what ``f.key``, ``f.invalidate`` and ``f.refresh`` return, and,
under ``TYPE_CHECKING`` (never run), calls mypy must refuse: each carries a ``type: ignore`` that
``--strict`` (``warn_unused_ignores``) reports if the refusal ever goes away."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from tiercache import TieredCache, WriteResult, tiered

if sys.version_info >= (3, 11):
    from typing import assert_type
else:
    from typing_extensions import assert_type


@pytest.fixture
def cache() -> Iterator[TieredCache]:
    c = TieredCache(namespace="typing")  # no Redis: L1 only
    yield c
    c.close()


def test_sync_function(cache: TieredCache) -> None:
    @tiered(cache, ttl=60)
    def square(x: int, *, offset: float = 0.0) -> float:
        return x * x + offset

    assert assert_type(square(3), float) == 9
    assert assert_type(square(3, offset=0.5), float) == 9.5
    assert isinstance(assert_type(square.key(3, offset=0.5), str), str)
    assert isinstance(assert_type(square.invalidate(3), WriteResult), WriteResult)
    assert assert_type(square.refresh(4), float) == 16
    assert assert_type(square.__wrapped__(2), float) == 4
    assert_type(square.cache, TieredCache)
    if TYPE_CHECKING:  # the function's own signature, in the call and in every helper
        square("3")  # type: ignore[arg-type]
        square(3, 0.5)  # type: ignore[call-arg]
        square.key(x="3")  # type: ignore[arg-type]
        square.invalidate(3, offset="0")  # type: ignore[arg-type]
        square.refresh()  # type: ignore[call-arg]


def test_async_function(cache: TieredCache) -> None:
    @tiered(cache)
    async def fetch(user_id: int) -> dict[str, int]:
        await asyncio.sleep(0)
        return {"id": user_id}

    assert isinstance(assert_type(fetch.key(1), str), str)  # plain, not awaited

    async def scenario() -> None:
        assert await assert_type(fetch(1), Coroutine[Any, Any, dict[str, int]]) == {"id": 1}
        assert assert_type(await fetch(1), dict[str, int]) == {"id": 1}
        assert isinstance(assert_type(await fetch.invalidate(1), WriteResult), WriteResult)
        assert assert_type(await fetch.refresh(1), dict[str, int]) == {"id": 1}
        assert assert_type(await fetch.__wrapped__(2), dict[str, int]) == {"id": 2}
        assert assert_type(await fetch.akey(1), str) == fetch.key(1)  # the key without blocking the loop

    asyncio.run(scenario())
    if TYPE_CHECKING:
        _ = fetch("1")  # type: ignore[arg-type]
        fetch.key(user="1")  # type: ignore[call-arg]
        _ = fetch.akey("1")  # type: ignore[arg-type]
        dict(fetch(1))  # type: ignore[call-overload]  # a coroutine until awaited


def test_methods(cache: TieredCache) -> None:
    class Repo:
        @tiered(cache)
        def find(self, x: int) -> list[int]:
            return [x]

        @tiered(cache)
        async def afind(self, x: int) -> list[int]:
            return [x]

    repo = Repo()
    assert assert_type(repo.find(1), list[int]) == [1]  # bound: self is gone from the helpers too
    assert isinstance(assert_type(repo.find.key(1), str), str)
    assert isinstance(assert_type(repo.find.invalidate(1), WriteResult), WriteResult)
    assert assert_type(repo.find.refresh(1), list[int]) == [1]
    assert assert_type(Repo.find(repo, 1), list[int]) == [1]  # from the class: self explicit
    assert isinstance(assert_type(repo.afind.key(1), str), str)

    async def scenario() -> None:
        assert assert_type(await repo.afind(2), list[int]) == [2]
        assert isinstance(assert_type(await repo.afind.invalidate(2), WriteResult), WriteResult)
        assert assert_type(await repo.afind.refresh(2), list[int]) == [2]
        assert assert_type(await repo.afind.akey(2), str) == repo.afind.key(2)  # bound: self gone too

    asyncio.run(scenario())
    if TYPE_CHECKING:
        repo.find(repo, 1)  # type: ignore[arg-type, call-arg]
        repo.find.key("1")  # type: ignore[arg-type]
        _ = repo.find.akey(1)  # type: ignore[attr-defined]  # a sync function has no akey
        Repo.find(1)  # type: ignore[arg-type, call-arg]
        _ = repo.afind("2")  # type: ignore[arg-type]


def test_staticmethod(cache: TieredCache) -> None:
    class Svc:
        @tiered(cache)
        @staticmethod
        def double(x: int) -> int:
            return 2 * x

    assert assert_type(Svc.double(3), int) == 6
    assert isinstance(assert_type(Svc.double.key(3), str), str)
    assert isinstance(assert_type(Svc.double.invalidate(3), WriteResult), WriteResult)
    assert assert_type(Svc.double.refresh(3), int) == 6
    # Known gap: through an instance, mypy binds x as if it were self (TieredFunction[[], int]).
    # When the overloads learn staticmethod, mypy reports this ignore as unused: drop it then.
    assert assert_type(Svc().double(3), int) == 6  # type: ignore[call-arg]
    if TYPE_CHECKING:
        Svc.double("3")  # type: ignore[arg-type]


def test_classmethod(cache: TieredCache) -> None:
    class Svc:
        @tiered(cache)
        @classmethod
        def make(cls, x: int) -> str:
            return f"{cls.__name__}:{x}"

    assert assert_type(Svc().make(1), str) == "Svc:1"
    assert isinstance(assert_type(Svc().make.key(1), str), str)
    # Known gap: from the class, mypy keeps cls in the signature (TieredFunction[[type[Svc], int], str]).
    # When the overloads learn classmethod, mypy reports these ignores as unused: drop them then.
    assert assert_type(Svc.make(1), str) == "Svc:1"  # type: ignore[call-arg, arg-type]
    assert isinstance(Svc.make.invalidate(1), WriteResult)  # type: ignore[call-arg, arg-type]
    assert Svc.make.refresh(1) == "Svc:1"  # type: ignore[call-arg, arg-type]
    if TYPE_CHECKING:
        Svc().make("1")  # type: ignore[arg-type]

"""Every Redis key and channel name, pinned: existing data and other processes depend on them,
so a change here must be deliberate (and a migration planned)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from tiercache import TieredCache, tiered
from tiercache._keys import (
    KeyMaker,
    KeySpace,
    digest,
    function_prefix,
    refresh_key,
    scoped_key,
    user_key,
    version_key,
    waiters_key,
)
from tiercache._metrics import COUNTER_FIELDS, CacheStats, Counters
from tiercache.errors import ConfigError, KeyEncodingError

TIERCACHE = Path(__file__).resolve().parents[2] / "tiercache"


def test_namespace_names() -> None:
    space = KeySpace("app", 3)
    assert space.channel == "tc:app:inval:3"
    assert space.seq_key == "tc:app:seq"
    assert space.gen_key == "tc:app:gen"
    assert space.base == space.root == "tc:app:v1:"
    assert re.fullmatch(r"tc:app:ack:[0-9a-f]{16}", space.ack_key())
    assert space.ack_key() != space.ack_key()
    assert KeySpace("a:b").channel == "tc:a:b:inval:0"


def test_value_keys_at_each_generation() -> None:
    space = KeySpace("app")
    assert space.user_key("user:1") == user_key("app", "user:1") == "tc:app:v1:k:{user:1}"
    braces = "#" + digest(b"a{b}")
    assert space.user_key("a{b}") == user_key("app", "a{b}") == "tc:app:v1:k:{" + braces + "}"
    assert function_prefix("app", "billing.convert") == "tc:app:v1:f:billing.convert:"
    assert space.function_key("f:billing.convert:", "ab" * 16) == "tc:app:v1:f:billing.convert:{" + "ab" * 16 + "}"
    assert space.advance("7")
    assert space.root == "tc:app:v1:g7:"
    assert space.generation_number() == 7
    assert space.user_key("user:1") == "tc:app:v1:g7:k:{user:1}"
    assert space.function_key("f:m.f:", "cd" * 16) == "tc:app:v1:g7:f:m.f:{" + "cd" * 16 + "}"
    assert space.owns("tc:app:v1:g7:k:{x}") and space.owns("tc:app:v1:f:m.f:{x}") and space.owns("tc:app:v1:k:{x}")
    assert not space.owns("tc:app:tag:{x}") and not space.owns("tc:other:v1:k:{x}")
    assert space.generation_of("tc:app:v1:g7:k:{x}") == "7"
    assert space.generation_of("tc:app:v1:f:m.f:{x}") == ""
    assert space.generation_of("tc:app:tag:{x}") is None
    assert not space.advance("6")  # forward only
    assert not space.advance("")
    assert space.root == "tc:app:v1:g7:"


def test_function_keys_of_a_decorated_function() -> None:
    cache = TieredCache(namespace="names")

    @tiered(cache, name="pinned.fn")
    def fn(x: int) -> int:
        return x

    assert fn.key(1) == "tc:names:v1:f:pinned.fn:{" + digest(b"s1:xi1;") + "}"
    maker = KeyMaker(lambda x: x, "tc:other:v1:f:m.g:")
    assert maker((1,), {}) == "tc:other:v1:f:m.g:{" + digest(b"s1:xi1;") + "}"


def test_version_and_scoped_keys() -> None:
    space = KeySpace("app")
    assert space.version_key("tag", "users") == version_key("app", "tag", "users") == "tc:app:tag:{users}"
    assert version_key("app", "tenant", 42) == "tc:app:tenant:{42}"  # type: ignore[arg-type]
    assert version_key("app", "tag", "a{b}") == "tc:app:tag:{#" + digest(b"a{b}") + "}"
    base = "tc:app:v1:f:m.f:{" + "ab" * 16 + "}"
    segment = "s" + digest(b"(2:s4:acme[1:i3;") + ":"
    assert scoped_key(base, "acme", [3]) == "tc:app:v1:f:m.f:" + segment + "{" + "ab" * 16 + "}"


def test_derived_keys_of_a_value_key() -> None:
    key = "tc:app:v1:k:{user:1}"
    assert waiters_key(key) == KeySpace.waiters_key(key) == "tc:app:v1:k:{user:1}:w"
    assert refresh_key(key) == KeySpace.refresh_key(key) == "tc:app:v1:k:{user:1}:r"


def test_bad_names_are_refused() -> None:
    with pytest.raises(ConfigError, match="braces"):
        function_prefix("app", "a{b}")
    with pytest.raises(KeyEncodingError, match="non-empty"):
        KeySpace("app").user_key("")


def test_names_are_built_only_in_keys() -> None:
    """No other module spells a Redis name (``f"tc:{...``) or a derived key's suffix."""
    offenders = []
    for path in sorted(TIERCACHE.glob("*.py")):
        if path.name == "_keys.py":
            continue
        text = path.read_text()
        for pattern in (r'f"tc:\{', r'\+ ":[wr]"'):
            offenders += [f"{path.name}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert offenders == []


def test_counters_come_from_one_definition() -> None:
    fields = {f.name: f for f in dataclasses.fields(CacheStats)}
    assert set(COUNTER_FIELDS) <= fields.keys()
    assert Counters.__slots__ == COUNTER_FIELDS
    counters = Counters()
    assert all(getattr(counters, name) == 0 for name in COUNTER_FIELDS)
    with pytest.raises(AttributeError):
        counters.no_such_counter = 1  # type: ignore[attr-defined]
    docs = (TIERCACHE.parent / "docs" / "recipes.md").read_text()
    for f in fields.values():
        metric = f.metadata["metric"] or f.name
        assert f"`{metric}`" in docs, f"docs/recipes.md does not list {metric}"

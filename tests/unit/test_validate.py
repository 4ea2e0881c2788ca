"""Argument checks (tiercache/_validate.py), through the public constructors: each ConfigError
names the argument as ``name=value`` and says what it must be."""

from __future__ import annotations

from typing import Any

import pytest

from tiercache import ConfigError, TieredCache, tiered, tiered_batch


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"ttl": float("inf")}, "ttl=inf must be a finite number of seconds > 0"),
        ({"ttl": True}, "ttl=True must be a finite number of seconds > 0"),
        ({"ack_timeout": -1}, "ack_timeout=-1 must be a finite number of seconds >= 0"),
        ({"outage_l1_ttl": "1"}, "outage_l1_ttl='1' must be a finite number of seconds >= 0 or None"),
        ({"pool_size": True}, "pool_size=True must be an int >= 1"),
        ({"l1_maxsize": -1}, "l1_maxsize=-1 must be an int >= 0 (0 turns L1 off)"),
        ({"l1_maxbytes": 0}, "l1_maxbytes=0 must be an int >= 1 or None"),
        ({"url": "redis://x", "client": object()}, "pass either url= or client=, not both"),
        ({"serializer": object()}, "serializer=<object"),
    ],
)
def test_cache_arguments(kwargs: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        TieredCache(namespace="validate", **kwargs)
    assert str(info.value).startswith(expected)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"refresh_beta": float("nan")}, "refresh_beta=nan must be a finite number >= 0 (0: off)"),
        ({"soft_timeout": 2, "hard_timeout": 1}, "soft_timeout=2 must be less than hard_timeout=1"),
        ({"ttl": 10, "refresh_after": 10}, "refresh_after=10 must be less than ttl=10 (it refreshes before expiry)"),
        ({"ttl_jitter": 1}, "ttl_jitter=1 must be a fraction in [0, 1), e.g. 0.1"),
        ({"tags": "user"}, "tags='user' must be a list of names (e.g. tags=['user']) or a function"),
        ({"tenant": "acme"}, "tenant='acme' must be a function of the call's arguments returning the tenant"),
    ],
)
def test_tiered_arguments(kwargs: dict[str, Any], expected: str) -> None:
    cache = TieredCache(namespace="validate")
    with pytest.raises(ConfigError) as info:
        tiered(cache, **kwargs)(lambda x: x)
    assert str(info.value) == expected


def test_decorators_and_writes() -> None:
    cache = TieredCache(namespace="validate")
    with pytest.raises(ConfigError, match=r"^tiered_batch\(cache=\.\.\.\) needs a TieredCache"):
        tiered_batch(object())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^@tiered_batch needs a function, got 3"):
        tiered_batch(cache)(3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^l1_ttl=-1 must be a finite number of seconds >= 0 or None"):
        tiered_batch(cache, l1_ttl=-1)
    with pytest.raises(ConfigError, match=r"^ttl=0 must be"):
        cache.set("k", 1, ttl=0)
    with pytest.raises(ConfigError, match=r"^timeout=-1 must be"):
        cache.delete("k", wait=True, timeout=-1)
    assert cache.set("k", 1, ttl=1, wait=True, timeout=0).seq is None  # L1 only: nothing to wait for

"""Generations never go backwards, and a counter that did (FLUSHALL, an eviction of
``tc:{ns}:gen``) brings every process to one generation again.

Before: a cache that resubscribed after a FLUSHALL adopted generation "" while the others kept
theirs; each side then read its own keys, deaf to the other's invalidations, for the entries'
whole Redis TTL.
"""

from __future__ import annotations

from typing import Any

import pytest
import redis

from tests.support import eventually, named_url, ready
from tiercache import ConfigError, TieredCache, tiered

pytestmark = [pytest.mark.redis]


def _kill_subscriber(raw: redis.Redis, name: str) -> None:
    ids = [c["id"] for c in raw.client_list() if c.get("name") == name and str(c.get("sub", "0")) != "0"]
    assert ids, f"no subscriber connection named {name}"
    for client_id in ids:
        raw.client_kill_filter(_id=client_id)


def _generation(cache: TieredCache) -> str:
    return cache._core.keyspace.generation


def test_a_resubscribing_cache_never_goes_back_and_the_others_follow(
    redis_server: Any, raw: redis.Redis, namespace: str
) -> None:
    a = ready(TieredCache(named_url(redis_server.url, f"{namespace}-a"), namespace=namespace))
    b = ready(TieredCache(redis_server.url, namespace=namespace))
    truth = {"v": 1}

    @tiered(a, name="g.f")
    def fa(x: int) -> int:
        return truth["v"]

    @tiered(b, name="g.f")
    def fb(x: int) -> int:
        return truth["v"]

    try:
        a.clear(wait=True)
        assert _generation(a) == _generation(b) == "1"
        raw.flushall()  # the counter goes back to nothing; nobody's subscription is touched
        _kill_subscriber(raw, f"{namespace}-a")  # a resubscribes, and reads the flushed counter
        eventually(lambda: _generation(a) == _generation(b) != "1", "one new generation for both", timeout=30)
        assert int(_generation(a)) > 1, "a generation went backwards"
        # One generation, so one set of keys: an invalidation from one reaches the other.
        ready(a)
        assert fb(1) == 1
        truth["v"] = 2
        a.invalidate(fa.key(1), wait=True)
        assert fb(1) == 2
    finally:
        a.close()
        b.close()


def test_a_write_after_a_flushall_brings_a_new_process_to_the_same_generation(
    redis_server: Any, raw: redis.Redis, namespace: str
) -> None:
    a = ready(TieredCache(redis_server.url, namespace=namespace))
    try:
        a.clear(wait=True)
        raw.flushall()
        c = ready(TieredCache(redis_server.url, namespace=namespace))  # a new process: reads ""
        try:
            a.set("x", 1)  # the sequence restarts: a sees the break and checks the generation
            # c may first follow a's keys to generation 1; a, seeing the sequence break, then
            # finds Redis behind it and starts generation 2, which both adopt.
            eventually(lambda: _generation(a) == _generation(c) == "2", "one new generation for both", timeout=30)
            c.set("y", 2, wait=True)
            assert a.get("y") == 2
        finally:
            c.close()
    finally:
        a.close()


def test_ready_says_when_the_acl_user_may_not_publish(mode: Any, own_redis: Any, own_raw: redis.Redis) -> None:
    own_raw.execute_command("ACL", "SETUSER", "nopub", "on", ">pw", "~*", "&*", "+@all", "-publish")
    url = f"redis://nopub:pw@127.0.0.1:{own_redis.port}/0"
    cache = TieredCache(url, namespace="acl")
    try:
        with pytest.raises(ConfigError, match="PUBLISH") as info:
            mode.run(mode.api(cache).ready(5))
        assert "+publish" in str(info.value)
    finally:
        if mode.is_async:
            mode.run(cache.aclose())
        else:
            cache.close()


def test_ready_says_when_the_acl_user_may_not_subscribe(own_redis: Any, own_raw: redis.Redis) -> None:
    own_raw.execute_command("ACL", "SETUSER", "nosub", "on", ">pw", "~*", "&*", "+@all", "-subscribe")
    cache = TieredCache(f"redis://nosub:pw@127.0.0.1:{own_redis.port}/0", namespace="acl")
    try:
        with pytest.raises(ConfigError, match="SUBSCRIBE"):
            cache.ready(5)
    finally:
        cache.close()


def test_an_evicted_generation_counter_alone_brings_everyone_to_one_generation(
    redis_server: Any, raw: redis.Redis, namespace: str
) -> None:
    """Only ``tc:{ns}:gen`` goes (an eviction): the sequence does not break, so the process
    still on the old generation learns it from the keys of a writer that read the lost counter."""
    a = ready(TieredCache(redis_server.url, namespace=namespace))
    truth = {"v": 1}

    @tiered(a, name="g.evicted")
    def fa(x: int) -> int:
        return truth["v"]

    try:
        a.clear(wait=True)
        assert fa(1) == 1  # cached by a, under generation 1
        raw.delete(f"tc:{namespace}:gen")
        c = ready(TieredCache(redis_server.url, namespace=namespace))  # reads no generation: ""

        @tiered(c, name="g.evicted")
        def fc(x: int) -> int:
            return truth["v"]

        try:
            truth["v"] = 2
            c.invalidate(fc.key(1), wait=True)
            eventually(lambda: _generation(a) == _generation(c) == "2", "one new generation for both", timeout=30)
            assert fa(1) == 2, "a must not keep serving its old generation's copy"
        finally:
            c.close()
    finally:
        a.close()

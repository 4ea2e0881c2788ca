"""Garbage in Redis under a call's key: a miss (the function's result), never code execution.

The planted payloads are pickles whose unpickling creates a marker file; each test first
checks that its payload really does create the file when unpickled, so a cache that did
unpickle it would be caught.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pathlib
import pickle
from collections.abc import Callable
from typing import Any

import msgpack
import pytest

from tiercache import PickleSerializer, tiered

pytestmark = pytest.mark.redis

MAGIC, VERSION = 0xC7, 1
MSGPACK, JSON, PICKLE = 1, 2, 3
SIGNED = 0b100
SIGNING_KEY = b"integration-test-signing-key-32b"


class _Touch:
    """Unpickles to ``pathlib.Path(path).touch()``: a stand-in for arbitrary code."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (pathlib.Path.touch, (self.path,))


def evil_pickle(marker: pathlib.Path) -> bytes:
    return pickle.dumps(_Touch(marker), protocol=pickle.HIGHEST_PROTOCOL)


def live_payload(tmp_path: pathlib.Path) -> Callable[[], bytes]:
    """A payload factory, after proving on a throwaway marker that such payloads do run code."""
    probe = tmp_path / "probe"
    pickle.loads(evil_pickle(probe))
    assert probe.exists(), "the evil payload does not work: the tests below would prove nothing"
    probe.unlink()
    return lambda: evil_pickle(tmp_path / "pwned")


def _ext(code: int, payload: Any) -> bytes:
    return bytes(msgpack.packb(msgpack.ExtType(code, msgpack.packb(payload))))


def header(serializer: int, flags: int = 0) -> bytes:
    return bytes((MAGIC, VERSION, serializer, flags))


def mac(key: bytes, redis_key: str, head: bytes, body: bytes) -> bytes:
    m = hmac.new(key, redis_key.encode(), hashlib.sha256)
    m.update(b"\x00" + head + body)
    return m.digest()


# Each maker gets (redis key, pickle bytes) and returns what is planted under the key.
PLAIN_CACHE_GARBAGE: dict[str, Callable[[str, bytes], bytes]] = {
    "pickle-envelope": lambda k, p: header(PICKLE) + p,
    "raw-pickle": lambda k, p: p,
    "pickle-envelope-signed-flag": lambda k, p: header(PICKLE, SIGNED) + os.urandom(32) + p,
    "msgpack-envelope-pickle-body": lambda k, p: header(MSGPACK) + p,
    "json-envelope-pickle-body": lambda k, p: header(JSON) + p,
    "zlib-flag-pickle-body": lambda k, p: header(MSGPACK, 1) + p,
    "unknown-flags": lambda k, p: header(MSGPACK, 0xF8) + p,
    "wrong-version": lambda k, p: bytes((MAGIC, 99, PICKLE, 0)) + p,
    "truncated-header": lambda k, p: bytes((MAGIC, VERSION)),
    "empty": lambda k, p: b"",
    # msgpack extension types naming a class that was never registered, or no type at all.
    "msgpack-unregistered-dataclass": lambda k, p: header(MSGPACK) + _ext(10, ["pathlib.Path", {"args": "x"}]),
    "msgpack-unregistered-enum": lambda k, p: header(MSGPACK) + _ext(14, ["os.system", "touch pwned"]),
    "msgpack-unknown-ext": lambda k, p: header(MSGPACK) + msgpack.packb(msgpack.ExtType(99, p)),
    "msgpack-truncated": lambda k, p: header(MSGPACK) + msgpack.packb({"a": [1, 2, 3]})[:-2],
}

SIGNED_CACHE_GARBAGE: dict[str, Callable[[str, bytes], bytes]] = {
    "unsigned-envelope": lambda k, p: header(PICKLE) + p,
    "raw-pickle": lambda k, p: p,
    "random-signature": lambda k, p: header(PICKLE, SIGNED) + os.urandom(32) + p,
    "signed-with-another-key": lambda k, p: (
        header(PICKLE, SIGNED) + mac(b"another-secret-key-of-32-bytes!!", k, header(PICKLE, SIGNED), p) + p
    ),
    "signed-for-another-redis-key": lambda k, p: (
        header(PICKLE, SIGNED) + mac(SIGNING_KEY, k + "x", header(PICKLE, SIGNED), p) + p
    ),
    "signature-over-other-header": lambda k, p: (
        header(PICKLE, SIGNED) + mac(SIGNING_KEY, k, header(PICKLE, SIGNED | 1), p) + p
    ),
    "truncated-signature": lambda k, p: header(PICKLE, SIGNED) + mac(SIGNING_KEY, k, header(PICKLE, SIGNED), p)[:16],
}


def check_garbage_is_a_miss(
    mode: Any, cache: Any, raw: Any, tmp_path: pathlib.Path, garbage: dict[str, Callable[[str, bytes], bytes]]
) -> None:
    payload = live_payload(tmp_path)
    calls: list[str] = []
    f = tiered(cache, name="victim")(mode.fn(lambda name: calls.append(name) or {"fresh": name}))
    for n, (name, make) in enumerate(garbage.items(), 1):
        key = f.key(name)
        raw.set(key, make(key, payload()))
        assert mode.call(f, name) == {"fresh": name}, f"{name}: not answered by the function"
        assert not (tmp_path / "pwned").exists(), f"{name}: the planted pickle was executed"
        assert cache.stats().codec_errors == n, f"{name}: not counted as a codec error"
    assert calls == list(garbage)
    assert cache.stats().backend_errors == 0

    # The user-key API: garbage is the default, not an exception.
    ukey = cache.key("planted")
    raw.set(ukey, header(PICKLE) + payload())
    assert mode.run(mode.api(cache).get("planted", "dflt")) == "dflt"
    raw.set(ukey, payload())
    assert mode.run(mode.api(cache).get("planted", "dflt")) == "dflt"
    assert not (tmp_path / "pwned").exists()


def test_garbage_under_a_key_is_a_miss_with_the_default_serializer(
    mode: Any, make_cache: Any, raw: Any, tmp_path: pathlib.Path
) -> None:
    check_garbage_is_a_miss(mode, make_cache(), raw, tmp_path, PLAIN_CACHE_GARBAGE)


def test_garbage_under_a_key_is_a_miss_with_a_signing_key(
    mode: Any, make_cache: Any, raw: Any, tmp_path: pathlib.Path
) -> None:
    check_garbage_is_a_miss(mode, make_cache(signing_key=SIGNING_KEY), raw, tmp_path, PLAIN_CACHE_GARBAGE)


def test_unsigned_or_badly_signed_pickles_are_never_loaded(
    mode: Any, make_cache: Any, raw: Any, tmp_path: pathlib.Path
) -> None:
    cache = make_cache(serializer=PickleSerializer(), signing_key=SIGNING_KEY)
    check_garbage_is_a_miss(mode, cache, raw, tmp_path, SIGNED_CACHE_GARBAGE)


def test_a_correctly_signed_pickle_is_loaded(mode: Any, make_cache: Any, raw: Any, tmp_path: pathlib.Path) -> None:
    """Control: the same layout with the right signature is an L2 hit (so the garbage tests
    above fail for the signature, not for a layout mistake)."""
    cache = make_cache(serializer=PickleSerializer(), signing_key=SIGNING_KEY)
    other = make_cache(serializer=PickleSerializer(), signing_key=b"another-secret-key-of-32-bytes!!")
    calls: list[str] = []
    f = tiered(cache, name="victim")(mode.fn(lambda name: calls.append(name) or "fresh"))
    g = tiered(other, name="victim")(mode.fn(lambda name: calls.append(name) or "fresh"))
    key = f.key("ok")
    body = pickle.dumps({"planted": [1, 2]})
    raw.set(key, header(PICKLE, SIGNED) + mac(SIGNING_KEY, key, header(PICKLE, SIGNED), body) + body)
    assert mode.call(f, "ok") == {"planted": [1, 2]}
    assert calls == []
    assert cache.stats().l2_hits == 1
    # A cache with another signing key refuses what this one signed.
    assert mode.call(g, "ok") == "fresh"
    assert other.stats().codec_errors == 1
    assert not (tmp_path / "pwned").exists()


def test_an_unreadable_entry_is_replaced_by_the_fresh_value(
    mode: Any, make_cache: Any, raw: Any, tmp_path: pathlib.Path
) -> None:
    """The read path turns unreadable bytes into a miss (invariant 6), and a miss stores the
    function's result: the garbage must not stay in Redis (here it has no TTL: for ever), making
    every process recompute the key on every L1 miss."""
    payload = live_payload(tmp_path)
    a, b = make_cache(), make_cache()
    calls: list[str] = []
    fa = tiered(a, name="victim")(mode.fn(lambda name: calls.append("a") or {"fresh": name}))
    fb = tiered(b, name="victim")(mode.fn(lambda name: calls.append("b") or {"fresh": name}))
    for name, make in PLAIN_CACHE_GARBAGE.items():
        key = fa.key(name)
        raw.set(key, make(key, payload()))
        assert mode.call(fa, name) == {"fresh": name}
        stored = raw.get(key)
        assert stored is not None and stored[:1] == bytes((MAGIC,)), f"{name}: garbage left in Redis"
        assert a._core.codec.decode(key, stored) == {"fresh": name}, f"{name}: garbage left in Redis"
        assert mode.call(fb, name) == {"fresh": name}
    assert calls == ["a"] * len(PLAIN_CACHE_GARBAGE), "another cache recomputed: the garbage was not replaced"
    assert not (tmp_path / "pwned").exists()

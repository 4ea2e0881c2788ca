"""Properties of cache keys: distinct values never share a key, equal ones always do, and keys
are the same in every process whatever its hash seed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiercache import TieredCache, tiered
from tiercache._keys import canonical_bytes, digest

NAN = float("nan")

# -- strategies -------------------------------------------------------------------------------

# Few distinct leaves, so that generated values often collide structurally (the interesting case).
small_leaves = st.sampled_from([0, 1, -1, True, False, 0.0, -0.0, 1.0, NAN, math.inf, None, "", "1", "a", b"", b"1"])
leaves = (
    small_leaves
    | st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63, max_value=2**200)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
hashables = st.recursive(leaves, lambda inner: st.tuples(inner) | st.lists(inner, max_size=3).map(tuple), max_leaves=6)
values = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(hashables, inner, max_size=4)
    ),
    max_leaves=12,
)
# For the cross-process check: sets and str-keyed dicts, whose iteration order follows the hash seed.
seeded_values = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(st.text(max_size=6), inner, max_size=5)
        | st.dictionaries(hashables, inner, max_size=3)
        | st.frozensets(st.text(max_size=6), max_size=6)
        | st.sets(st.text(max_size=6) | st.binary(max_size=4), max_size=6)
    ),
    max_leaves=12,
)


def canon(v: Any) -> Any:
    """The documented equality of arguments: same type structure and equal values, where
    -0.0 equals 0.0 and NaN equals NaN; dict and set order does not matter."""
    t = type(v)
    if t is float:
        return ("float", "nan" if math.isnan(v) else (v + 0.0).hex())
    if v is None or t in (bool, int, str, bytes):
        return (t.__name__, v)
    if t in (tuple, list):
        return (t.__name__, tuple(canon(x) for x in v))
    if t is dict:
        return ("dict", tuple(sorted(((canon(k), canon(x)) for k, x in v.items()), key=repr)))
    if t in (set, frozenset):
        return (t.__name__, tuple(sorted((canon(x) for x in v), key=repr)))
    raise AssertionError(f"unexpected {t}")


def arg(value: Any) -> Any:
    return value


CACHE = TieredCache(namespace="prop")
F = tiered(CACHE, name="prop.arg")(arg)


def fresh_key(v: Any) -> str:
    return digest(canonical_bytes(v))


# -- distinct values, distinct keys -----------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(values, min_size=2, max_size=6))
def test_keys_equal_iff_values_equal_under_the_rules(batch: list[Any]) -> None:
    canons = [canon(v) for v in batch]
    for _ in range(2):  # the second pass answers from the memo where it can
        keys = [F.key(v) for v in batch]
        fresh = [fresh_key(v) for v in batch]
        for i in range(len(batch)):
            for j in range(len(batch)):
                same = canons[i] == canons[j]
                assert (keys[i] == keys[j]) == same, (batch[i], batch[j])
                assert (fresh[i] == fresh[j]) == same, (batch[i], batch[j])


@settings(max_examples=150, deadline=None)
@given(st.lists(small_leaves, min_size=1, max_size=3), st.lists(small_leaves, min_size=1, max_size=3))
def test_keys_of_multi_argument_calls(a: list[Any], b: list[Any]) -> None:
    def three(x: Any, y: Any = None, z: Any = None) -> Any:
        return x

    f = tiered(CACHE, name="prop.three")(three)
    same = canon(tuple(a) + (None,) * (3 - len(a))) == canon(tuple(b) + (None,) * (3 - len(b)))
    for _ in range(2):
        assert (f.key(*a) == f.key(*b)) == same
        kw_a = dict(zip("xyz", a, strict=False))
        kw_b = dict(zip("xyz", b, strict=False))
        assert (f.key(**kw_a) == f.key(**kw_b)) == same
        assert f.key(*a) == f.key(**kw_a)


# -- equal values, equal keys -----------------------------------------------------------------


def rebuilt(v: Any) -> Any:
    """An equal value built anew: reversed dict and set insertion order, -0.0 for 0.0, new NaNs."""
    t = type(v)
    if t is float:
        if math.isnan(v):
            return float("nan")
        return -0.0 if v == 0 else float(repr(v))
    if t in (tuple, list):
        return t(rebuilt(x) for x in v)
    if t is dict:
        return {rebuilt(k): rebuilt(x) for k, x in reversed(list(v.items()))}
    if t in (set, frozenset):
        return t(rebuilt(x) for x in reversed(list(v)))
    if t is str:
        return "".join(list(v))
    if t is bytes:
        return bytes(bytearray(v))
    if t is int and not isinstance(v, bool):
        return int(str(v))
    return v


@settings(max_examples=150, deadline=None)
@given(seeded_values)
def test_equal_values_share_a_key(v: Any) -> None:
    w = rebuilt(v)
    assert canon(v) == canon(w)
    assert F.key(v) == F.key(w)
    assert fresh_key(v) == fresh_key(w)
    assert F.key(value=w) == F.key(v)


# -- the same keys in another process ---------------------------------------------------------

# Runs in the child and in this process: rebuilds values from a typed JSON form and derives keys.
CHILD = r"""
import json, sys
from tiercache import TieredCache, tiered
from tiercache._keys import canonical_bytes, digest

def from_json(j):
    tag = j[0]
    if tag == "N": return None
    if tag == "T": return bool(j[1])
    if tag == "i": return int(j[1])
    if tag == "f": return float.fromhex(j[1])
    if tag == "s": return j[1]
    if tag == "b": return bytes.fromhex(j[1])
    if tag == "t": return tuple(from_json(x) for x in j[1])
    if tag == "l": return [from_json(x) for x in j[1]]
    if tag == "d": return {from_json(k): from_json(v) for k, v in j[1]}
    if tag == "S": return {from_json(x) for x in j[1]}
    if tag == "F": return frozenset(from_json(x) for x in j[1])
    raise ValueError(tag)

def arg(value):
    return value

def keys_of(batch):
    f = tiered(TieredCache(namespace="prop"), name="prop.arg")(arg)
    out = []
    for v in map(from_json, batch):
        out.append([f.key(v), f.key(value=v), digest(canonical_bytes(v))])
    return out

if __name__ == "__main__":
    print(json.dumps(keys_of(json.load(sys.stdin))))
"""

_child_ns: dict[str, Any] = {}
exec(compile(CHILD, "<child>", "exec"), _child_ns)


def to_json(v: Any) -> Any:
    t = type(v)
    if v is None:
        return ["N"]
    if t is bool:
        return ["T", v]
    if t is int:
        return ["i", str(v)]
    if t is float:
        return ["f", v.hex()]
    if t is str:
        return ["s", v]
    if t is bytes:
        return ["b", v.hex()]
    if t is tuple:
        return ["t", [to_json(x) for x in v]]
    if t is list:
        return ["l", [to_json(x) for x in v]]
    if t is dict:
        return ["d", [[to_json(k), to_json(x)] for k, x in v.items()]]
    if t is set:
        return ["S", [to_json(x) for x in v]]
    if t is frozenset:
        return ["F", [to_json(x) for x in v]]
    raise AssertionError(t)


ROOT = Path(__file__).absolute().parents[2]  # the checkout: tests/property/<this file>


def keys_in_child(batch_json: list[Any], seed: str) -> list[list[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONHASHSEED"] = seed
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD],
        input=json.dumps(batch_json),
        capture_output=True,
        text=True,
        env=env,
        cwd=str(ROOT),
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: list[list[str]] = json.loads(proc.stdout)
    return result


def test_child_imports_this_checkout() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-c", "import tiercache; print(tiercache.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(ROOT),
        timeout=60,
        check=True,
    ).stdout.strip()
    assert Path(out).parent == (ROOT / "tiercache")


@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(seeded_values, min_size=20, max_size=40))
def test_keys_are_stable_across_processes(batch: list[Any]) -> None:
    batch_json = [to_json(v) for v in batch]
    json.loads(json.dumps(batch_json))
    rebuilt_batch = [_child_ns["from_json"](j) for j in batch_json]
    assert [canon(v) for v in rebuilt_batch] == [canon(v) for v in batch]
    here = _child_ns["keys_of"](batch_json)
    assert [k[0] for k in here] == [F.key(v) for v in batch]
    assert [k[2] for k in here] == [fresh_key(v) for v in batch]
    for seed in ("0", "4242"):
        assert keys_in_child(batch_json, seed) == here

"""Real OS processes sharing one redis-server and namespace: keys agree, and L2 is shared.

Each process runs the script below with ``sys.executable`` and a different PYTHONHASHSEED
(so any use of ``hash()`` or of set/dict iteration order in keys would show), and prints
one JSON line: the keys it derived, how many times its function ran, and its answers.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import pytest

pytestmark = [pytest.mark.redis, pytest.mark.slow]

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

SCRIPT = r'''
import asyncio
import datetime as dt
import json
import sys

from tiercache import TieredCache, tiered

url, namespace, style = sys.argv[1:4]
cache = TieredCache(url, namespace=namespace)
assert cache.ready(10), "subscriber did not subscribe"
calls = 0

ARGS = [
    ((1, "a"), {}),
    (("héllo", frozenset({"x", "y", "z", "w"})), {}),
    (({"b": 2, "a": [1, {"s", "t", "u"}]},), {"flag": True}),
    ((dt.date(2024, 1, 31), (None, 2.5, b"\x00")), {}),
]


def canon(v):
    """A description of ``v`` that does not depend on the hash seed (sets are sorted)."""
    if isinstance(v, (set, frozenset)):
        return [type(v).__name__, sorted(json.dumps(canon(x)) for x in v)]
    if isinstance(v, dict):
        return ["dict", sorted([json.dumps(canon(k)), json.dumps(canon(x))] for k, x in v.items())]
    if isinstance(v, (list, tuple)):
        return [type(v).__name__, [canon(x) for x in v]]
    return repr(v)


def expected(*args, flag=False):
    return {"args": canon(args), "flag": flag, "n": len(args)}


if style == "sync":
    @tiered(cache, name="shared.compute", ttl=60)
    def compute(*args, flag=False):
        global calls
        calls += 1
        return expected(*args, flag=flag)

    answers = [compute(*a, **kw) for a, kw in ARGS]
else:
    @tiered(cache, name="shared.compute", ttl=60)
    async def compute(*args, flag=False):
        global calls
        calls += 1
        return expected(*args, flag=flag)

    async def main():
        try:
            return [await compute(*a, **kw) for a, kw in ARGS]
        finally:
            await cache.aclose()

    answers = asyncio.run(main())

keys = [compute.key(*a, **kw) for a, kw in ARGS]
ok = [answer == expected(*a, **kw) for answer, (a, kw) in zip(answers, ARGS)]
stats = cache.stats()
cache.close()
print(json.dumps({
    "keys": keys,
    "user_keys": [cache.key("user:1"), cache.key("{braces}")],
    "calls": calls,
    "ok": ok,
    "l2_hits": stats.l2_hits,
    "backend_errors": stats.backend_errors,
}))
'''


def run_process(script: pathlib.Path, url: str, namespace: str, style: str, hash_seed: int) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONHASHSEED"] = str(hash_seed)
    proc = subprocess.run(
        [sys.executable, str(script), url, namespace, style],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"process ({style}, seed {hash_seed}) failed:\n{proc.stderr}"
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def start_process(script: pathlib.Path, url: str, namespace: str, style: str, hash_seed: int) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONHASHSEED"] = str(hash_seed)
    return subprocess.Popen(
        [sys.executable, str(script), url, namespace, style],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str]) -> dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, f"process failed:\n{err}"
    return dict(json.loads(out.strip().splitlines()[-1]))


def test_a_value_computed_in_one_process_is_an_l2_hit_in_others(
    redis_server: Any, raw: Any, namespace: str, tmp_path: pathlib.Path
) -> None:
    script = tmp_path / "tiercache_process.py"
    script.write_text(SCRIPT)
    a = run_process(script, redis_server.url, namespace, "sync", hash_seed=1)
    assert a["calls"] == 4, "process A should have computed every call"
    assert all(a["ok"])
    assert a["backend_errors"] == 0
    assert raw.exists(*a["keys"]) == 4, "process A's results are not in Redis"

    # B (sync) and C (async) at the same time, with other hash seeds: all L2 hits.
    procs = [
        start_process(script, redis_server.url, namespace, "sync", hash_seed=2),
        start_process(script, redis_server.url, namespace, "async", hash_seed=3),
    ]
    b, c = (finish(p) for p in procs)
    for name, other in (("B", b), ("C", c)):
        assert other["keys"] == a["keys"], f"process {name} derived other keys than A"
        assert other["user_keys"] == a["user_keys"], f"process {name} derived other user keys than A"
        assert other["calls"] == 0, f"process {name} ran its function {other['calls']} times: not L2 hits"
        assert other["l2_hits"] == 4
        assert all(other["ok"]), f"process {name} got wrong answers"
        assert other["backend_errors"] == 0
    assert len(set(a["keys"])) == 4


def test_keys_do_not_depend_on_the_hash_seed(redis_server: Any, namespace: str, tmp_path: pathlib.Path) -> None:
    """Two processes each computing for themselves (other namespaces) still derive the same keys,
    up to the namespace."""
    script = tmp_path / "tiercache_process.py"
    script.write_text(SCRIPT)
    procs = [start_process(script, redis_server.url, f"{namespace}{seed}", "sync", hash_seed=seed) for seed in (11, 12)]
    first, second = (finish(p) for p in procs)
    assert first["calls"] == second["calls"] == 4
    strip = [k.replace(f"{namespace}11", "NS") for k in first["keys"]]
    assert strip == [k.replace(f"{namespace}12", "NS") for k in second["keys"]]

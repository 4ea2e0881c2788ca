"""A cache created before os.fork() (gunicorn --preload, multiprocessing 'fork') stays coherent
in the child: the child starts with L1 off and empty, runs its own subscriber, and hears
invalidations from the parent."""

from __future__ import annotations

import os
import sys

import pytest

from tests.support import RedisServer
from tiercache import TieredCache, tiered

pytestmark = [pytest.mark.redis, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork exists on POSIX only")
def test_forked_child_runs_its_own_subscriber(redis_server: RedisServer, namespace: str) -> None:
    truth = redis_server.client()
    truth_key = f"truth:{namespace}"
    truth.set(truth_key, 1)
    cache = TieredCache(redis_server.url, namespace=namespace)
    assert cache.ready()

    @tiered(cache, name="fork.f")
    def f(k: int) -> int:
        return int(truth.get(truth_key) or 0)

    assert f(0) == f(0) == 1
    assert cache.stats().l1_hits >= 1
    to_parent_r, to_parent_w = os.pipe()
    to_child_r, to_child_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report failures through the exit code, never return into pytest
        code = 1
        try:
            os.close(to_parent_r)
            os.close(to_child_w)
            assert cache.stats().l1_size == 0, "the child must not trust the parent's L1"
            assert cache.ready(5), "the child's own subscriber never subscribed"
            assert f(0) == 1 and f(0) == 1
            assert cache.stats().l1_size == 1
            os.write(to_parent_w, b"r")
            assert os.read(to_child_r, 1) == b"i"  # the parent has invalidated, with wait=True
            assert f(0) == 2, "the parent's invalidation did not reach the child's L1"
            code = 0
        except BaseException as exc:
            print(f"child failed: {exc!r}", file=sys.stderr)
        finally:
            os._exit(code)
    os.close(to_parent_w)
    os.close(to_child_r)
    try:
        assert os.read(to_parent_r, 1) == b"r"
        truth.set(truth_key, 2)
        result = cache.invalidate(f.key(0), wait=True)
        assert result.receivers == 2 and result.complete, result
        os.write(to_child_w, b"i")
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(to_parent_r)
        os.close(to_child_w)
        cache.close()
    assert os.waitstatus_to_exitcode(status) == 0

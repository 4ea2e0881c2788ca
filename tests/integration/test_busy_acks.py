"""``wait=True`` against a busy process: the acknowledgements its callers' polls queue are sent
at once, not at the subscriber thread's next PING (which came up to ``staleness_bound / 2``
later: 10 of 10 writes were incomplete with ``timeout=0.2``)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from tests.support import ready
from tiercache import TieredCache, tiered

pytestmark = [pytest.mark.redis]


def test_wait_true_completes_against_a_process_whose_callers_poll(redis_server: Any, namespace: str) -> None:
    # A long ping interval (6 s) makes the old behaviour obvious: acks waited for it. The 3 s
    # timeout leaves a loaded CI machine room, and is still half that interval.
    writer = ready(TieredCache(redis_server.url, namespace=namespace, staleness_bound=12.0))
    busy = ready(TieredCache(redis_server.url, namespace=namespace, staleness_bound=12.0))
    stop = threading.Event()

    @tiered(busy, name="hot")
    def hot(x: int) -> int:
        return x

    def spin() -> None:  # a CPU-bound caller: L1 hits back to back, so the callers poll
        while not stop.is_set():
            for _ in range(1000):
                hot(1)

    hot(1)
    threads = [threading.Thread(target=spin) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        results = [writer.set(f"k{i}", i, wait=True, timeout=3.0) for i in range(10)]
    finally:
        stop.set()
        for t in threads:
            t.join()
        writer.close()
        busy.close()
    incomplete = [r for r in results if not r.complete]
    assert not incomplete, f"{len(incomplete)} of 10 wait=True writes timed out: {incomplete}"

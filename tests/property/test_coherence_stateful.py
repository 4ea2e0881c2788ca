"""Several TieredCache nodes on one real Redis, driven by Hypothesis against a model.

The model is the source of truth (a dict) plus the user-key store. Every write waits for
acknowledgements, and a dropped subscriber connection is followed by waiting until the nodes
noticed it (the bound has passed); so at every step exactly one value is allowed.
"""

from __future__ import annotations

import uuid

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from tests.support import RedisServer, eventually
from tiercache import TieredCache, tiered

pytestmark = pytest.mark.redis

KEYS = st.sampled_from(["a", "b", "c"])
VALUES = st.integers(0, 1000)
NODES = 3


def test_nodes_never_serve_a_value_the_model_forbids(redis_server: RedisServer) -> None:
    class Nodes(RuleBasedStateMachine):
        @initialize()
        def start(self) -> None:
            namespace = "st" + uuid.uuid4().hex[:10]
            self.truth: dict[str, int] = {"a": 0, "b": 0, "c": 0}
            self.stored: dict[str, int] = {}
            self.caches = [TieredCache(redis_server.url, namespace=namespace) for _ in range(NODES)]
            for cache in self.caches:
                assert cache.ready(10)
            truth = self.truth
            self.fns = [tiered(c, name="stateful.f")(lambda k: truth[k]) for c in self.caches]

        def teardown(self) -> None:
            for cache in getattr(self, "caches", []):
                cache.close()

        @rule(node=st.integers(0, NODES - 1), k=KEYS)
        def call(self, node: int, k: str) -> None:
            assert self.fns[node](k) == self.truth[k]

        @rule(node=st.integers(0, NODES - 1), k=KEYS, v=VALUES)
        def change_truth_and_invalidate(self, node: int, k: str, v: int) -> None:
            self.truth[k] = v
            result = self.caches[node].invalidate(self.fns[node].key(k), wait=True)
            assert result.complete, result

        @rule(node=st.integers(0, NODES - 1), k=KEYS, v=VALUES)
        def set_value(self, node: int, k: str, v: int) -> None:
            result = self.caches[node].set(k, v, wait=True)
            assert result.complete, result
            self.stored[k] = v

        @rule(node=st.integers(0, NODES - 1), k=KEYS)
        def delete_value(self, node: int, k: str) -> None:
            result = self.caches[node].delete(k, wait=True)
            assert result.complete, result
            self.stored.pop(k, None)

        @rule(node=st.integers(0, NODES - 1), k=KEYS)
        def get_value(self, node: int, k: str) -> None:
            assert self.caches[node].get(k, -1) == self.stored.get(k, -1)

        @rule(wait_ready=st.booleans())
        def drop_subscriber_connections(self, wait_ready: bool) -> None:
            before = [c.stats().bus_flushes for c in self.caches]
            redis_server.client().client_kill_filter(_type="pubsub")
            eventually(
                lambda: all(c.stats().bus_flushes > b for c, b in zip(self.caches, before, strict=True)),
                "every node to notice its subscriber was killed",
            )
            if wait_ready:
                for cache in self.caches:
                    assert cache.ready(5)

        @invariant()
        def nothing_in_flight(self) -> None:
            for cache in getattr(self, "caches", []):
                assert cache.stats().in_flight == 0

    run_state_machine_as_test(Nodes, settings=settings(max_examples=15, stateful_step_count=25, deadline=None))

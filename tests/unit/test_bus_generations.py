"""The bus and writers' generations, without Redis: ``Bus.handle`` fed messages directly."""

from __future__ import annotations

import json

from tiercache._coherence import Bus
from tiercache._flight import FlightTable
from tiercache._keys import KeySpace
from tiercache._local import LocalCache
from tiercache._metrics import RateLimitedLog


def _bus() -> tuple[Bus, KeySpace]:
    space = KeySpace("app")
    space.advance("3")  # this process is on generation 3
    flights = FlightTable(LocalCache(100, None, lambda: 0.0))
    bus = Bus(space, "me", flights, RateLimitedLog(), space.advance)
    bus.subscribed(0, "3")
    return bus, space


def _message(seq: int, key: str) -> bytes:
    return json.dumps({"n": "writer", "s": seq, "k": [key], "a": ""}).encode()


def test_a_writer_ahead_is_followed() -> None:
    bus, space = _bus()
    bus.handle([_message(1, "tc:app:v1:g5:k:{x}")])
    assert space.generation == "5"
    assert not bus.resync


def test_a_writer_behind_asks_for_one_resync_not_one_per_message() -> None:
    """A writer on an older generation (a coherent=False process never reads it) makes the
    subscriber check Redis once; its next messages cost nothing more."""
    bus, space = _bus()
    bus.handle([_message(1, "tc:app:v1:k:{x}")])
    assert bus.resync
    bus.resync = False  # the subscriber ran the check: Redis was already ahead
    for seq in range(2, 50):
        bus.handle([_message(seq, "tc:app:v1:k:{x}")])
    assert not bus.resync
    assert space.generation == "3"  # never back


def test_tag_counters_and_other_namespaces_name_no_generation() -> None:
    bus, _ = _bus()
    bus.handle([_message(1, "tc:app:tag:{t}"), _message(2, "tc:other:v1:k:{x}")])
    assert not bus.resync

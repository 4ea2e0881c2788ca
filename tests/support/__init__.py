"""What the tests share, once each: a clock, a loader, waiting (``eventually``, gates, crowds),
the ``mode`` of a scenario, fakeredis caches, and redis-server processes.

Fixtures built on these live in ``tests/conftest.py`` (``clock``, ``gate``, ``joined``, ``mode``,
``redis_server``, ``own_redis``) and ``tests/integration/conftest.py`` (``make_cache``, ``raw``)."""

from tests.support.clock import Clock
from tests.support.loader import AsyncOnly, Boom, Embedder, Loader, Pause, SyncOnly
from tests.support.modes import FakeRedisCaches, L1Caches, MemoryCaches, Mode, RedisCaches
from tests.support.redis_server import RedisServer, free_port, named_clients, named_url, other_clients, ready
from tests.support.waiting import WAIT, Gate, Joined, Mark, aeventually, crowd, eventually

__all__ = [
    "WAIT",
    "AsyncOnly",
    "Boom",
    "Clock",
    "Embedder",
    "FakeRedisCaches",
    "Gate",
    "Joined",
    "L1Caches",
    "Loader",
    "Mark",
    "MemoryCaches",
    "Mode",
    "Pause",
    "RedisCaches",
    "RedisServer",
    "SyncOnly",
    "aeventually",
    "crowd",
    "eventually",
    "free_port",
    "named_clients",
    "named_url",
    "other_clients",
    "ready",
]

"""tiercache: a per-process L1 in front of Redis, coherent across processes.

Quick start::

    from tiercache import TieredCache, tiered

    cache = TieredCache("redis://127.0.0.1:6379/0", namespace="myapp", ttl=300)

    @tiered(cache, ttl=60)
    def get_user(user_id: int) -> dict:
        ...

    @tiered(cache)
    async def fetch_page(url: str) -> bytes:
        ...
"""

from ._batch import BatchFunction, tiered_batch
from ._cache import AsyncCacheView, TieredCache
from ._codec import JsonSerializer, MsgpackSerializer, PickleSerializer
from ._coherence import WriteResult
from ._decorator import AsyncTieredFunction, TieredFunction, tiered
from ._keys import json_key, llm_key
from ._metrics import CacheStats
from ._types import MISSING, Serializer
from .errors import (
    BackendError,
    CodecError,
    ConfigError,
    KeyEncodingError,
    LoadTimeoutError,
    TierCacheError,
    ValueTooLargeError,
)

__all__ = [
    "MISSING",
    "AsyncCacheView",
    "AsyncTieredFunction",
    "BackendError",
    "BatchFunction",
    "CacheStats",
    "CodecError",
    "ConfigError",
    "JsonSerializer",
    "KeyEncodingError",
    "LoadTimeoutError",
    "MsgpackSerializer",
    "PickleSerializer",
    "Serializer",
    "TierCacheError",
    "TieredCache",
    "TieredFunction",
    "ValueTooLargeError",
    "WriteResult",
    "json_key",
    "llm_key",
    "tiered",
    "tiered_batch",
]

__version__ = "0.1.0"

for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("tiercache."):
        _obj.__module__ = "tiercache"
del _name, _obj

"""The exceptions tiercache raises, all rooted at :class:`TierCacheError`.

The tree::

    TierCacheError
    ├── ConfigError(ValueError)        a bad argument to TieredCache or tiered()
    ├── KeyEncodingError(TypeError)    an argument cannot be turned into a stable key
    ├── CodecError(ValueError)         a value cannot be serialized (or bytes decoded)
    │   └── ValueTooLargeError         a value is above ``max_value_bytes``
    ├── BackendError                   Redis failed; raised only with ``strict=True``
    │                                  (the redis-py error is ``__cause__``)
    └── LoadTimeoutError(TimeoutError) a load outlasted ``hard_timeout`` (and no stale
                                       value was there to serve instead)

Redis exceptions never escape raw: without ``strict`` they are counted and logged and the
call is answered from L1 or the function.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "CodecError",
    "ConfigError",
    "KeyEncodingError",
    "LoadTimeoutError",
    "TierCacheError",
    "ValueTooLargeError",
]


class TierCacheError(Exception):
    """Base class of every exception tiercache raises."""


class ConfigError(TierCacheError, ValueError):
    """A configuration argument is invalid; the message names it and says what to pass."""


class KeyEncodingError(TierCacheError, TypeError):
    """A call argument cannot be encoded into a stable cache key.

    The message names the parameter and the path inside it (``user['tags'][2]``).
    Fix it by passing encodable values, defining ``__tiercache_key__`` on the class,
    or giving ``tiered(..., key=...)``.
    """


class CodecError(TierCacheError, ValueError):
    """A value cannot be serialized by the configured serializer, or bytes cannot be decoded."""


class ValueTooLargeError(CodecError):
    """An encoded value is larger than ``max_value_bytes``; it is returned but not cached."""


class BackendError(TierCacheError):
    """Redis failed (down, slow, or answered garbage) and the cache is in strict mode."""


class LoadTimeoutError(TierCacheError, TimeoutError):
    """A decorated function's load ran past its ``hard_timeout`` and no value within
    ``stale_ttl`` was there to answer with. The load itself is not cached as failed: the next
    call starts a new one (an async load is cancelled; a sync one cannot be stopped and
    finishes in its worker thread, its result dropped)."""

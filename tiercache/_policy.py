"""How one decorated function (or ``cache.get``) uses the tiers: its :class:`Policy`, and
:class:`CachedError`, the L1 value of a remembered exception (``cache_errors``)."""

from __future__ import annotations

import math

from ._types import RNG

__all__ = ["CachedError", "Policy"]


class CachedError:
    """An exception kept in L1 by ``cache_errors`` (negative caching): raised, not returned."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class Policy:
    """How calls of one decorated function (or ``cache.get``) use the tiers: the decorator's
    arguments with the cache's defaults filled in, plus what is learnt while running (the
    function's typical load time, for XFetch). Validated by the caller."""

    __slots__ = (
        "cache_errors",
        "detached",
        "early",
        "error_ttl",
        "hard_timeout",
        "inspect",
        "l1_ttl",
        "load_time",
        "name",
        "refresh_after",
        "refresh_beta",
        "soft_timeout",
        "stale_ttl",
        "ttl",
        "ttl_jitter",
    )

    def __init__(
        self,
        name: str,
        ttl: float,
        l1_ttl: float,
        *,
        stale_ttl: float = 0.0,
        soft_timeout: float | None = None,
        hard_timeout: float | None = None,
        refresh_beta: float = 0.0,
        refresh_after: float | None = None,
        ttl_jitter: float = 0.0,
        cache_errors: tuple[type[BaseException], ...] = (),
        error_ttl: float = 0.0,
    ) -> None:
        self.name = name
        self.ttl = ttl
        self.l1_ttl = l1_ttl
        self.stale_ttl = stale_ttl
        self.soft_timeout = soft_timeout
        self.hard_timeout = hard_timeout
        self.refresh_beta = refresh_beta
        self.refresh_after = refresh_after
        self.ttl_jitter = ttl_jitter
        self.cache_errors = cache_errors
        self.error_ttl = error_ttl
        #: Seconds the function took, a moving average (XFetch's delta).
        self.load_time = 0.0
        #: Refresh ahead of expiry: L1 entries turn "due" before they expire.
        self.early = refresh_beta > 0 or refresh_after is not None
        #: Loads run in the background, callers wait with timeouts.
        self.detached = soft_timeout is not None or hard_timeout is not None
        #: A call past an entry's ``fresh_until`` must look at the entry (refresh-ahead, stale
        #: copies, cached errors) before loading.
        self.inspect = self.early or stale_ttl > 0 or bool(cache_errors)

    def record_load_time(self, seconds: float) -> None:
        self.load_time = seconds if self.load_time == 0.0 else 0.8 * self.load_time + 0.2 * seconds

    def l2_ttl(self) -> float:
        """The TTL of one fill in Redis: ``ttl``, shortened by up to ``ttl_jitter`` of it at
        random so keys filled together do not expire together."""
        if self.ttl_jitter:
            return self.ttl * (1.0 - self.ttl_jitter * RNG.random())
        return self.ttl

    def fresh_until(self, expires: float) -> float | None:
        """When an entry that ends in Redis at ``expires`` becomes due for a refresh ahead of
        time: XFetch (Vattani et al., VLDB 2015) draws ``delta * beta * -ln(U)`` before the
        end, once per fill and process rather than per read (so the hit path stays a dict
        lookup and one comparison), and ``refresh_after`` is a fixed soft TTL."""
        if not self.early:
            return None
        points = []
        if self.refresh_after is not None:
            points.append(expires - self.ttl + self.refresh_after)
        if self.refresh_beta > 0:
            u = 1.0 - RNG.random()  # in (0, 1]
            points.append(expires - self.load_time * self.refresh_beta * -math.log(u))
        return min(points)

"""What the flow asks of Redis: Lua scripts, command records (Ops), and the circuit breaker.

No client objects live here; the sync and async drivers execute these records. Each record
is one round trip: the read script answers the value *and* its remaining TTL, the write
script changes values, bumps the namespace's sequence number and publishes the invalidation
in one atomic step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "FAILED",
    "Breaker",
    "RedisOp",
    "RemoteFailure",
    "Script",
    "ack",
    "await_ack",
    "fetch",
    "publish",
    "fill",
    "lease_key",
    "read_seq",
    "take_acks",
    "write",
]


class Script:
    """A Lua script, run by EVALSHA; the drivers fall back to EVAL on NOSCRIPT (which loads it)."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA-1


class RedisOp:
    """One Redis round trip: the command's arguments and how to read its reply."""

    __slots__ = ("args", "parse", "script")

    def __init__(
        self, args: tuple[Any, ...], parse: Callable[[Any], Any] | None = None, script: Script | None = None
    ) -> None:
        self.args = args
        self.parse = parse
        self.script = script

    def fallback_args(self) -> tuple[Any, ...]:
        """The EVAL form of an EVALSHA op, for a server that does not know the script yet."""
        assert self.script is not None
        return ("EVAL", self.script.source, *self.args[2:])


class RemoteFailure(Exception):
    """Raised by a driver into the flow when Redis failed; ``__cause__`` is the redis-py error."""


class _Failed:
    __slots__ = ()

    def __repr__(self) -> str:
        return "FAILED"


#: What a remote step returns to the flow when Redis failed (and strict mode is off).
FAILED: Any = _Failed()

# KEYS[1] the value, KEYS[2] its lease. ARGV[1] a lease token ('' for none), ARGV[2] lease ms.
# A hit answers {value, pttl}; a miss answers 1 when it took the lease, 0 when not.
_READ = Script("""
local v = redis.call('GET', KEYS[1])
if v then return {v, redis.call('PTTL', KEYS[1])} end
if ARGV[1] ~= '' and redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
""")

# KEYS[1] the value, KEYS[2] its lease. ARGV[1] token, ARGV[2] bytes, ARGV[3] ttl ms.
# Invariant 3: the fill lands only while the lease taken on the miss is still ours; any write
# or invalidation of the key since then deleted the lease, so a stale fill is refused.
_FILL = Script("""
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('DEL', KEYS[2])
return 1
""")

# KEYS[1] the namespace's sequence counter, then (value key, lease key) pairs.
# ARGV[1] origin node id, ARGV[2] channel, ARGV[3] 'set' or 'del', ARGV[4] ttl in ms,
# ARGV[5] the list receivers push their acknowledgement on ('' for none), ARGV[6..] the
# values (for 'set').
# Redis first (deleting the leases, so loads in flight cannot fill over this write), then
# one message for the whole batch.
_WRITE = Script("""
local keys = {}
for i = 2, #KEYS, 2 do
  local n = #keys + 1
  keys[n] = KEYS[i]
  if ARGV[3] == 'set' then
    redis.call('SET', KEYS[i], ARGV[5 + n], 'PX', ARGV[4])
  else
    redis.call('DEL', KEYS[i])
  end
  redis.call('DEL', KEYS[i + 1])
end
local seq = redis.call('INCR', KEYS[1])
local receivers = redis.call('PUBLISH', ARGV[2], cjson.encode({n = ARGV[1], s = seq, k = keys, a = ARGV[5]}))
return {seq, receivers}
""")


def lease_key(key: str) -> str:
    """The lease of ``key``: after the key's ``{hash tag}``, so both share a Redis Cluster slot."""
    return key + ":lease"


def _parse_fetch(reply: Any) -> tuple[bytes, int] | bool:
    if isinstance(reply, list):
        data, pttl = reply
        return data, int(pttl)
    return bool(reply)


def _parse_write(reply: Any) -> tuple[int, int]:
    seq, receivers = reply
    return int(seq), int(receivers)


def fetch(key: str, token: str = "", lease_ms: int = 0) -> RedisOp:
    """GET and PTTL of ``key`` in one round trip, taking its lease on a miss when ``token``.

    Parses to ``(bytes, pttl_ms)`` on a hit, else to whether the lease was taken."""
    return RedisOp(("EVALSHA", _READ.sha, 2, key, lease_key(key), token, lease_ms), _parse_fetch, _READ)


def fill(key: str, token: str, data: bytes, ttl_ms: int) -> RedisOp:
    """Store a load's result if the lease ``token`` is still valid; parses to whether it landed."""
    return RedisOp(("EVALSHA", _FILL.sha, 2, key, lease_key(key), token, data, ttl_ms), bool, _FILL)


def write(
    seq_key: str,
    channel: str,
    node_id: str,
    keys: Sequence[str],
    values: Sequence[bytes] | None,
    ttl_ms: int,
    ack_key: str = "",
) -> RedisOp:
    """Set (``values``) or delete (``values=None``) ``keys``, then publish their invalidation.

    Parses to ``(seq, receivers)``: the message's sequence number and PUBLISH's count."""
    argv: tuple[Any, ...] = (node_id, channel, "set" if values is not None else "del", ttl_ms, ack_key)
    if values is not None:
        argv += tuple(values)
    pairs = [k for key in keys for k in (key, lease_key(key))]
    return RedisOp(("EVALSHA", _WRITE.sha, 1 + len(pairs), seq_key, *pairs, *argv), _parse_write, _WRITE)


# A subscriber's acknowledgement of a message that asked for one (a ``wait=True`` write):
# pushed onto the write's own list, which expires on its own if the writer stopped waiting.
_ACK = Script("""
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
""")


def ack(ack_key: str, node_id: str, keep_ms: int = 30_000) -> RedisOp:
    return RedisOp(("EVALSHA", _ACK.sha, 1, ack_key, node_id, keep_ms), None, _ACK)


def await_ack(ack_key: str, timeout: float) -> RedisOp:
    """Block up to ``timeout`` seconds for one acknowledgement; parses to 1 or 0."""
    return RedisOp(("BLPOP", ack_key, f"{timeout:.3f}"), lambda reply: 1 if reply else 0)


def take_acks(ack_key: str, count: int) -> RedisOp:
    """Take up to ``count`` acknowledgements that are already there; parses to how many."""
    return RedisOp(("LPOP", ack_key, count), lambda reply: len(reply) if reply else 0)


def read_seq(seq_key: str) -> RedisOp:
    """The namespace's current sequence number (0 when no write happened yet)."""
    return RedisOp(("GET", seq_key), lambda reply: int(reply) if reply else 0)


def publish(channel: str, message: str) -> RedisOp:
    return RedisOp(("PUBLISH", channel, message))


class Breaker:
    """Consecutive-failure circuit breaker: a dead Redis costs callers nearly nothing.

    Closed: every call goes to Redis. After ``threshold`` failures in a row it opens and
    calls skip Redis for ``cooldown`` seconds; then one call probes (half-open): success
    closes it, failure opens it again.
    """

    __slots__ = ("_clock", "_cooldown", "_failures", "_open_until", "_threshold")

    def __init__(self, threshold: int, cooldown: float, clock: Callable[[], float]) -> None:
        self._threshold = threshold
        self._cooldown = cooldown
        self._clock = clock
        self._failures = 0
        self._open_until = 0.0

    @property
    def is_open(self) -> bool:
        return self._failures >= self._threshold and self._clock() < self._open_until

    def allow(self) -> bool:
        if self._failures < self._threshold:
            return True
        now = self._clock()
        if now < self._open_until:
            return False
        self._open_until = now + self._cooldown  # this caller probes; the others keep skipping
        return True

    def success(self) -> None:
        self._failures = 0

    def failure(self) -> None:
        self._failures += 1
        if self._failures >= self._threshold:
            self._open_until = self._clock() + self._cooldown

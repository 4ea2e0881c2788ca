"""What the flow asks of Redis: Lua scripts, command records (Ops), and the circuit breaker.

No client objects live here; the sync and async drivers execute these records. Each record
is one round trip: the read (two pipelined commands, no Lua) answers the value *and* its
remaining TTL and takes the lease on a miss; the write script changes values, bumps the
namespace's sequence number and publishes the invalidation in one atomic step.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

from ._keys import refresh_key, waiters_key
from ._types import FAILED

__all__ = [
    "FAILED",
    "Breaker",
    "PoolBusy",
    "RedisOp",
    "RemoteFailure",
    "UnreadableReply",
    "Script",
    "abandon_refresh",
    "ack",
    "await_ack",
    "clear",
    "begin_refresh",
    "failure",
    "fetch",
    "fetch_many",
    "fill",
    "fill_many",
    "finish",
    "finish_refresh",
    "peek",
    "sync_generation",
    "probe_publish",
    "release",
    "release_many",
    "replace",
    "take_acks",
    "versions",
    "wait_lease",
    "write",
]


class Script:
    """A Lua script, run by EVALSHA; the drivers fall back to EVAL on NOSCRIPT (which loads it)."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA-1


class RedisOp:
    """One Redis round trip: a command (plus ``more`` commands pipelined behind it, sent in one
    write and answered in one read) and how to read the reply (a list of replies with ``more``)."""

    __slots__ = ("args", "coalesce", "more", "parse", "script")

    def __init__(
        self,
        args: tuple[Any, ...],
        parse: Callable[[Any], Any] | None = None,
        script: Script | None = None,
        more: tuple[tuple[Any, ...], ...] = (),
        coalesce: bool = False,
    ) -> None:
        self.args = args
        self.parse = parse
        self.script = script
        self.more = more
        #: A quick read that may share a pipeline with other tasks' reads (``coalesce_reads``):
        #: never a blocking command or a script.
        self.coalesce = coalesce

    def fallback_args(self) -> tuple[Any, ...]:
        """The EVAL form of an EVALSHA op, for a server that does not know the script yet."""
        assert self.script is not None
        return ("EVAL", self.script.source, *self.args[2:])


class RemoteFailure(Exception):
    """Raised by a driver into the flow when Redis failed; ``__cause__`` is the redis-py error."""


class UnreadableReply(RemoteFailure):
    """Redis answered, but with something we cannot read (a foreign value under one of our
    keys): the call fails open, and the breaker does not count it (Redis is up)."""


class PoolBusy(RemoteFailure):
    """No connection of this process's pool was free in time: local saturation, which says
    nothing about Redis, so it fails the call open without counting against the breaker."""


def failure(exc: BaseException) -> RemoteFailure:
    """What a driver sends the flow when running an op raised ``exc``: a RemoteFailure chained
    to it (whatever the client raised: racing ``close()``, redis-py raises e.g. TypeError too,
    and the flow fails open all the same). For a RemoteFailure, a new one of the same kind and
    cause (PoolBusy stays PoolBusy): each reader of a coalesced batch gets its own."""
    if isinstance(exc, RemoteFailure):
        wrapped = type(exc)()
        wrapped.__cause__ = exc.__cause__
    else:
        wrapped = RemoteFailure()
        wrapped.__cause__ = exc
    return wrapped


def finish(op: RedisOp, reply: Any) -> Any:
    """The flow's reply to ``op`` from Redis's ``reply`` (a list of replies when the op has
    ``more``): parsed by ``op.parse``; a reply it cannot read (e.g. a foreign value under
    one of our keys) is an UnreadableReply, which fails the call open."""
    parse = op.parse
    if parse is None:
        return reply
    try:
        return parse(reply)
    except Exception as exc:
        raise UnreadableReply() from exc


#: First bytes of a lease marker: the envelope magic with format version 0, never a value.
LEASE_PREFIX = b"\xc7\x00"

# Leases live in the value key itself. A miss is answered by ``SET key <marker> NX PX lease GET``
# (pipelined with PTTL): if the key holds a value, nothing is written and the value comes back
# (a hit, with its TTL); if it holds another process's marker, that comes back (someone else
# is loading); if it is empty, our marker is now there and we hold the lease. So a hit runs no
# Lua and a miss takes its lease in the same round trip, and any write or invalidation of the
# key (SET or DEL) replaces the marker: invariant 3 with no extra key.

# Processes that find another's marker wait for the fill to be announced instead of polling
# (``wait_lease``): they raise the key's waiter flag ``<key>:w`` (``_keys.waiters_key``, same
# hash slot), and a fill or release that finds the flag publishes ``{"n": node, "f": [key]}``
# on the invalidation channel. Fills nobody waits for publish nothing.

# KEYS[1] the value, KEYS[2] its waiter flag. ARGV[1] our marker, ARGV[2] lease ms, ARGV[3]
# the marker prefix, ARGV[4] this process's marker prefix. A value: {bytes, pttl}. Empty (the
# holder released, or its lease expired): take the lease, nil. Another's marker: raise the
# waiter flag for as long as that lease lives, and answer its PTTL (negated when the marker
# is this process's own).
_WAIT = Script("""
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return false
end
local left = redis.call('PTTL', KEYS[1])
if string.sub(v, 1, 2) == ARGV[3] then
  if left < 1 then left = tonumber(ARGV[2]) end
  redis.call('SET', KEYS[2], '1', 'PX', left)
  if string.sub(v, 1, #ARGV[4]) == ARGV[4] then return -left end
  return left
end
return {v, left}
""")

# KEYS[1] the value. ARGV[1] the unreadable bytes found, ARGV[2] new bytes, ARGV[3] ttl ms:
# overwrite bytes we could not decode, unless someone wrote the key since we read them.
_REPLACE = Script("""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
""")

# KEYS[1] the namespace's sequence counter, then (value key, refresh key) pairs.
# ARGV[1] origin node id, ARGV[2] channel, ARGV[3] 'set' or 'del', ARGV[4] ttl in ms,
# ARGV[5] the list receivers push their acknowledgement on ('' for none), ARGV[6..] the
# values (for 'set'); 'incr' bumps version counters (tags, tenants) instead. Redis first
# (replacing any lease marker and deleting any refresh token, so neither a load nor a refresh
# in flight can land over this write), then one message for the whole batch.
_WRITE = Script("""
local keys = {}
for i = 2, #KEYS, 2 do
  local n = #keys + 1
  keys[n] = KEYS[i]
  if ARGV[3] == 'set' then
    redis.call('SET', KEYS[i], ARGV[5 + n], 'PX', ARGV[4])
  elseif ARGV[3] == 'incr' then
    redis.call('INCR', KEYS[i])
  else
    redis.call('DEL', KEYS[i])
  end
  redis.call('DEL', KEYS[i + 1])
end
local seq = redis.call('INCR', KEYS[1])
local receivers = redis.call('PUBLISH', ARGV[2], cjson.encode({n = ARGV[1], s = seq, k = keys, a = ARGV[5]}))
return {seq, receivers}
""")


def _parse_read(replies: list[Any]) -> tuple[bytes, int] | bool:
    """``(bytes, pttl_ms)`` for a value; for no value, whether we now hold the lease."""
    data, pttl = replies
    if data is None or data is False:  # the key was empty: our marker is there now (or no lease asked)
        return True
    if data[:2] == LEASE_PREFIX:  # someone else is loading it
        return False
    return data, int(pttl)


def fetch(key: str, marker: bytes, lease_ms: int) -> RedisOp:
    """A read that takes the lease on a miss, in one round trip and without Lua (see above)."""
    return RedisOp(("SET", key, marker, "NX", "PX", lease_ms, "GET"), _parse_read, more=(("PTTL", key),), coalesce=True)


def peek(key: str) -> RedisOp:
    """A plain read (``cache.get``): GET and PTTL pipelined; no lease."""
    return RedisOp(("GET", key), _parse_read, more=(("PTTL", key),), coalesce=True)


def fill(key: str, marker: bytes, data: bytes, ttl_ms: int, channel: str, node_id: str) -> RedisOp:
    """Store a load's result if our lease marker is still there (announcing it to waiters);
    parses to whether it landed. (``fill_many`` of one key: one script serves both.)"""
    op = fill_many([key], marker, [data], ttl_ms, channel, node_id)
    op.parse = lambda landed: landed == 1
    return op


def release(key: str, marker: bytes, channel: str, node_id: str) -> RedisOp:
    """Give our lease of ``key`` back (waking waiters): ``release_many`` of one key."""
    return release_many([key], marker, channel, node_id)


def _parse_wait(reply: Any) -> tuple[bytes, int] | bool | int:
    if reply is None:
        return True  # the lease is ours now
    if isinstance(reply, list):
        return reply[0], int(reply[1])
    # A lease holder holds it for this many more milliseconds: negative when the holder is a
    # load of this very process (its marker starts with ours).
    return int(reply)


def wait_lease(key: str, marker: bytes, lease_ms: int) -> RedisOp:
    """Look again at a key another process is loading: parses to ``(bytes, pttl_ms)`` for a
    value, True when we took the lease (it was released or expired), or the milliseconds the
    other lease has left (and the waiter flag is raised, so its fill will be announced),
    negated when the holder is this process (its marker has our prefix)."""
    ours = marker[: marker.rindex(b":") + 1]
    return RedisOp(
        ("EVALSHA", _WAIT.sha, 2, key, waiters_key(key), marker, lease_ms, LEASE_PREFIX, ours), _parse_wait, _WAIT
    )


def replace(key: str, old: bytes, data: bytes, ttl_ms: int) -> RedisOp:
    return RedisOp(("EVALSHA", _REPLACE.sha, 1, key, old, data, ttl_ms), bool, _REPLACE)


def _parse_write(reply: Any) -> tuple[int, int]:
    seq, receivers = reply
    return int(seq), int(receivers)


def write(
    seq_key: str,
    channel: str,
    node_id: str,
    keys: Sequence[str],
    values: Sequence[bytes] | None,
    ttl_ms: int,
    ack_key: str = "",
    incr: bool = False,
) -> RedisOp:
    """Set (``values``) or delete (``values=None``) ``keys``, or ``incr`` them (version
    counters), then publish their invalidation.

    Parses to ``(seq, receivers)``: the message's sequence number and PUBLISH's count."""
    mode = "incr" if incr else "set" if values is not None else "del"
    argv: tuple[Any, ...] = (node_id, channel, mode, ttl_ms, ack_key)
    if values is not None:
        argv += tuple(values)
    pairs = [k for key in keys for k in (key, refresh_key(key))]
    return RedisOp(("EVALSHA", _WRITE.sha, 1 + len(pairs), seq_key, *pairs, *argv), _parse_write, _WRITE)


# KEYS[1] sequence counter, KEYS[2] value, KEYS[3] its refresh token. ARGV[1] node id,
# ARGV[2] channel, ARGV[3] our token, ARGV[4] bytes, ARGV[5] ttl ms, ARGV[6] ack list ('' none).
# A refresh computes while the old value keeps being served; it lands only if no write or
# invalidation of the key came since it started (they delete the token): invariant 3.
_REFRESH = Script("""
if redis.call('GET', KEYS[3]) ~= ARGV[3] then return false end
redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[5])
redis.call('DEL', KEYS[3])
local seq = redis.call('INCR', KEYS[1])
local receivers = redis.call('PUBLISH', ARGV[2], cjson.encode({n = ARGV[1], s = seq, k = {KEYS[2]}, a = ARGV[6]}))
return {seq, receivers}
""")


# KEYS[1] a refresh token. ARGV[1] ours: a refresh that failed gives it back (only its own).
_END_REFRESH = Script("""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
""")


def abandon_refresh(key: str, token: bytes) -> RedisOp:
    return RedisOp(("EVALSHA", _END_REFRESH.sha, 1, refresh_key(key), token), None, _END_REFRESH)


def begin_refresh(key: str, token: bytes, lease_ms: int, exclusive: bool = False) -> RedisOp:
    """Start a refresh of ``key``: parses to whether its token is set (``exclusive``: only if
    no other refresh of the key is running, so one process refreshes a hot key ahead of time)."""
    args: tuple[Any, ...] = ("SET", refresh_key(key), token, "PX", lease_ms)
    return RedisOp((*args, "NX") if exclusive else args, lambda reply: reply is not None and reply is not False)


def finish_refresh(
    seq_key: str, channel: str, node_id: str, key: str, token: bytes, data: bytes, ttl_ms: int
) -> RedisOp:
    """Store a refresh's result and publish, if its token survived; parses to (seq, receivers)
    or False when a write or invalidation came first."""
    return RedisOp(
        ("EVALSHA", _REFRESH.sha, 3, seq_key, key, refresh_key(key), node_id, channel, token, data, ttl_ms, ""),
        lambda reply: _parse_write(reply) if reply else False,
        _REFRESH,
    )


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
    # BLPOP's timeout 0 means "forever": never let rounding produce it.
    return RedisOp(("BLPOP", ack_key, f"{max(timeout, 0.001):.3f}"), lambda reply: 1 if reply else 0)


def take_acks(ack_key: str, count: int) -> RedisOp:
    """Take up to ``count`` acknowledgements that are already there; parses to how many."""
    return RedisOp(("LPOP", ack_key, count), lambda reply: len(reply) if reply else 0)


def _parse_read_many(replies: list[Any]) -> list[tuple[bytes, int] | bool]:
    return [_parse_read(replies[i : i + 2]) for i in range(0, len(replies), 2)]


def fetch_many(keys: Sequence[str], marker: bytes, lease_ms: int) -> RedisOp:
    """``fetch`` of several keys in one round trip (a pipeline, no Lua): parses to one
    ``(bytes, pttl)`` / True (our lease) / False (another's lease) per key."""
    commands = [c for key in keys for c in (("SET", key, marker, "NX", "PX", lease_ms, "GET"), ("PTTL", key))]
    return RedisOp(commands[0], _parse_read_many, more=tuple(commands[1:]), coalesce=True)


# KEYS: the values, then their waiter flags. ARGV[1] our marker, ARGV[2] ttl ms, ARGV[3]
# channel, ARGV[4] node id, ARGV[5..] the bytes. The fill of a load (one key) or a batch (several),
# in one round trip. Invariant 3: a key is stored only while our marker still holds it.
_FILL_MANY = Script("""
local n = #KEYS / 2
local landed, waited = 0, {}
for i = 1, n do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('SET', KEYS[i], ARGV[4 + i], 'PX', ARGV[2])
    landed = landed + 1
    if redis.call('DEL', KEYS[n + i]) == 1 then waited[#waited + 1] = KEYS[i] end
  end
end
if #waited > 0 then redis.call('PUBLISH', ARGV[3], cjson.encode({n = ARGV[4], f = waited})) end
return landed
""")

# KEYS: the values, then their waiter flags. ARGV[1] our marker, ARGV[2] channel, ARGV[3] node:
# give leases back (the load failed or stores nothing), waking whoever waits for them.
_RELEASE_MANY = Script("""
local n = #KEYS / 2
local waited = {}
for i = 1, n do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('DEL', KEYS[i])
    if redis.call('DEL', KEYS[n + i]) == 1 then waited[#waited + 1] = KEYS[i] end
  end
end
if #waited > 0 then redis.call('PUBLISH', ARGV[2], cjson.encode({n = ARGV[3], f = waited})) end
return 0
""")


def fill_many(
    keys: Sequence[str], marker: bytes, datas: Sequence[bytes], ttl_ms: int, channel: str, node_id: str
) -> RedisOp:
    flags = [waiters_key(k) for k in keys]
    return RedisOp(
        ("EVALSHA", _FILL_MANY.sha, 2 * len(keys), *keys, *flags, marker, ttl_ms, channel, node_id, *datas),
        None,
        _FILL_MANY,
    )


def release_many(keys: Sequence[str], marker: bytes, channel: str, node_id: str) -> RedisOp:
    flags = [waiters_key(k) for k in keys]
    return RedisOp(
        ("EVALSHA", _RELEASE_MANY.sha, 2 * len(keys), *keys, *flags, marker, channel, node_id), None, _RELEASE_MANY
    )


def versions(keys: Sequence[str]) -> RedisOp:
    """Version counters (tags, tenants): parses to their values, 0 for a counter never bumped."""
    return RedisOp(("MGET", *keys), lambda reply: [int(v) if v else 0 for v in reply], coalesce=True)


# KEYS[1] the sequence counter, KEYS[2] the generation. ARGV[1] the caller's generation,
# ARGV[2] channel, ARGV[3] node id. Generations never go backwards: a counter that did (a
# FLUSHALL, an eviction) while this process kept a later one would split the processes into
# two sets of keys, each deaf to the other's invalidations. So a caller ahead of Redis starts
# a generation above its own (no process has entries under it: everyone's copies are dropped,
# as a clear() would) and announces it; everyone adopts it.
_SYNC_GENERATION = Script("""
local cur = tonumber(redis.call('GET', KEYS[2])) or 0
local mine = tonumber(ARGV[1]) or 0
if mine > cur then
  local gen = tostring(mine + 1)
  redis.call('SET', KEYS[2], gen)
  local seq = redis.call('INCR', KEYS[1])
  redis.call('PUBLISH', ARGV[2], cjson.encode({n = ARGV[3], s = seq, k = {}, g = gen, a = ''}))
  return {seq, gen}
end
return {tonumber(redis.call('GET', KEYS[1])) or 0, redis.call('GET', KEYS[2]) or ''}
""")


def probe_publish(channel: str, node_id: str) -> RedisOp:
    """PUBLISH an empty fill announcement (a no-op for every receiver): fails with NOPERM when
    the ACL user may not publish on the invalidation channel."""
    return RedisOp(("PUBLISH", channel, json.dumps({"n": node_id, "f": []})))


def sync_generation(seq_key: str, gen_key: str, generation: int, channel: str, node_id: str) -> RedisOp:
    """The namespace's sequence number (0 when no write happened yet) and generation ("" when it
    was never cleared), read after the caller's ``generation`` is made the floor (see above)."""
    return RedisOp(
        ("EVALSHA", _SYNC_GENERATION.sha, 2, seq_key, gen_key, generation, channel, node_id),
        lambda r: (int(r[0]), r[1].decode() if isinstance(r[1], bytes) else str(r[1])),
        _SYNC_GENERATION,
    )


# KEYS[1] the sequence counter, KEYS[2] the generation. ARGV[1] node id, ARGV[2] channel,
# ARGV[3] ack list ('' none), ARGV[4] the caller's generation: clear the whole namespace.
# Generations are numbered, so two clears racing each other cannot leave a process on the
# older one; and the new number is above the caller's, so a lost (or foreign) counter cannot
# hand out one every process would ignore.
_CLEAR = Script("""
local gen = tostring(math.max(tonumber(redis.call('GET', KEYS[2])) or 0, tonumber(ARGV[4]) or 0) + 1)
redis.call('SET', KEYS[2], gen)
local seq = redis.call('INCR', KEYS[1])
local receivers = redis.call('PUBLISH', ARGV[2], cjson.encode({n = ARGV[1], s = seq, k = {}, g = gen, a = ARGV[3]}))
return {seq, receivers, gen}
""")


def clear(seq_key: str, gen_key: str, channel: str, node_id: str, current: int, ack_key: str = "") -> RedisOp:
    """Start a new generation of the namespace; parses to ``(seq, receivers, generation)``."""
    return RedisOp(
        ("EVALSHA", _CLEAR.sha, 2, seq_key, gen_key, node_id, channel, ack_key, current),
        lambda r: (int(r[0]), int(r[1]), r[2].decode() if isinstance(r[2], bytes) else str(r[2])),
        _CLEAR,
    )


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

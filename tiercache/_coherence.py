"""Invalidation messages and what this process's L1 does on a message, a loss, a resubscribe.

Pure: the subscriber thread (``_sync.Subscriber``) does the socket work and calls in here.
Every write runs one Lua script that changes Redis, increments the namespace's sequence
number and publishes ``{"n": origin node, "s": seq, "k": [keys], "a": ack list}`` on
``tc:{namespace}:inval:{db}``. For a ``wait=True`` write every receiver pushes its node id onto the
ack list once it has applied the message.

The same channel carries fill announcements, ``{"n": origin node, "f": [keys]}``: published
by a fill (or a lease release) only when another process raised the key's waiter flag, they
wake those waiters (see ``_remote.wait_lease``) and invalidate nothing. They are not
numbered: losing one costs a waiter its timeout, never coherence.

Invariant 4: L1 is trusted only while the subscriber is known to be subscribed; whenever
that is in doubt (disconnect, half-open connection, a gap in the sequence, a malformed
message) L1 is flushed, and it stays off until the subscription is confirmed again.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable, Sequence
from typing import Any

from ._flight import FlightTable
from ._keys import KeySpace, _generation_number
from ._metrics import RateLimitedLog

__all__ = ["Bus", "WriteResult"]


@dataclasses.dataclass(frozen=True)
class WriteResult:
    """What a write (``set``, ``delete``, ``invalidate``, ``refresh``) reached.

    Attributes:
        seq: the namespace sequence number Redis gave the write's message (None: Redis failed,
            or no Redis is configured).
        receivers: how many subscribers Redis delivered the message to (PUBLISH's reply),
            this process's own subscriber included when it is connected.
        acknowledged: with ``wait=True``, how many of them confirmed they had applied it
            before the call returned (equal to ``receivers`` unless the timeout passed);
            None without ``wait``.
    """

    seq: int | None
    receivers: int | None
    acknowledged: int | None = None

    @property
    def complete(self) -> bool:
        """True when every receiver acknowledged (only meaningful with ``wait=True``)."""
        return self.receivers is not None and self.acknowledged == self.receivers


class Bus:
    """The subscriber's view: whether L1 may be trusted, the last sequence seen, pending acks."""

    def __init__(
        self,
        keyspace: KeySpace,
        node_id: str,
        flights: FlightTable,
        log: RateLimitedLog,
        on_generation: Callable[[str], None] = lambda generation: None,
    ) -> None:
        self._on_generation = on_generation
        #: The namespace's Redis names: the channel, and the generation a writer's keys name.
        self.keyspace = keyspace
        #: Set when the sequence broke: the subscriber thread then checks that Redis's
        #: generation did not go backwards (``_remote.sync_generation``) before going on.
        self.resync = False
        #: The (writer's, ours) generations of the last resync a lagging writer caused.
        self._resynced_for: tuple[str, str] | None = None
        #: Why this process's writes cannot reach the others (the ACL user may not PUBLISH
        #: on the channel), found when subscribing; ``cache.ready()`` raises it.
        self.denied: str | None = None
        self.node_id = node_id
        self.channel = keyspace.channel
        self._flights = flights
        self._log = log
        self.last_seq: int | None = None
        self._base = 0
        self._past_base = False
        self.connected = threading.Event()
        self.messages = 0
        self.flushes = 0
        self.gaps = 0

    @property
    def channels(self) -> tuple[str]:
        return (self.channel,)

    # -- subscriber events ------------------------------------------------------------------

    def subscribed(self, base_seq: int, generation: str = "") -> None:
        """The subscription is confirmed and ``base_seq`` (and the namespace's ``generation``,
        never behind ours: see ``_remote.sync_generation``) read after it: trust L1 again,
        starting empty (messages may have been lost while we were not subscribed)."""
        self._on_generation(generation)
        self.resync = False
        self.last_seq = base_seq
        self._base = base_seq
        self._past_base = False
        self.flushes += 1
        self._flights.flush(accepting=True)
        self.connected.set()

    def apply_generation(self, generation: str) -> None:
        """Adopt ``generation`` if it is later than ours (never go back)."""
        self._on_generation(generation)

    def lost(self) -> None:
        """The subscription is gone or in doubt: stop trusting L1 until resubscribed."""
        self.connected.clear()
        self.last_seq = None
        self.flushes += 1
        self._flights.flush(accepting=False)

    def handle(self, payloads: Sequence[bytes]) -> list[str]:
        """Apply a batch of messages; return the ack lists to push this node's id onto."""
        keys: list[str] = []
        acks: list[str] = []
        filled: list[str] = []
        for payload in payloads:
            msg = self._parse(payload)
            if msg is None:
                continue
            if isinstance(msg, list):
                filled.extend(msg)
                continue
            self.messages += 1
            seq, origin, msg_keys, ack_key, generation = msg
            if generation is not None:
                self._on_generation(generation)  # the namespace was cleared: new keys, L1 flushed
            elif msg_keys and origin != self.node_id:
                self._check_writer_generation(msg_keys[0])
            self._follow_sequence(seq)
            if origin != self.node_id:  # our own writes updated our L1 already
                keys.extend(msg_keys)
            if ack_key:
                acks.append(ack_key)
        if keys:
            self._flights.evict(keys)
        if filled:
            self._flights.announced(filled)
        return acks

    def _follow_sequence(self, seq: int) -> None:
        """Advance ``last_seq`` to a message's ``seq``, flushing L1 when the sequence broke."""
        if self.last_seq is None:
            return  # not subscribed (a test may feed messages directly)
        if not self._past_base and seq <= self._base:
            return  # written before we read the base: already reflected in Redis
        if seq != self.last_seq + 1:
            # A gap (some message never reached us), or the counter went backwards
            # (the sequence key was flushed or evicted, so later gaps would look like
            # old messages): anything may be stale. Flush and follow the new count.
            self.gaps += 1
            self._log.emit(
                "gap", "tiercache: invalidation sequence broke (%s after %s): flushing L1", seq, self.last_seq
            )
            self._flights.flush(accepting=True)
            self.resync = True  # e.g. a FLUSHALL: the generation may have gone too
        self.last_seq = seq
        self._past_base = True

    def _check_writer_generation(self, key: str) -> None:
        """A writer's keys name its generation (``tc:{ns}:v1:g<n>:...``, none: ""). One ahead
        of us: adopt it. One behind: the counter in Redis went backwards without the sequence
        breaking (an eviction of ``tc:{ns}:gen`` alone), and a process that read it since
        writes keys nobody else reads: have the subscriber bring Redis (and so everyone) to a
        generation above ours (``_remote.sync_generation``)."""
        theirs = self.keyspace.generation_of(key)
        if theirs is None:
            return  # not a generation-scoped key (tag and tenant counters)
        ours = self.keyspace.generation
        if theirs == ours:
            return
        if _generation_number(theirs) > _generation_number(ours):
            self._on_generation(theirs)
        elif (theirs, ours) != self._resynced_for:
            # Once per lagging generation: a writer that stays behind (a coherent=False
            # process, which never reads the generation) must not cost a round trip per message.
            self._resynced_for = (theirs, ours)
            self.resync = True

    def _parse(self, payload: bytes) -> tuple[int, str, list[str], str, str | None] | list[str] | None:
        """An invalidation as ``(seq, origin, keys, ack list)``; a fill announcement as its keys."""
        try:
            msg: Any = json.loads(payload)
            if "f" in msg:
                return [str(k) for k in msg["f"]] if isinstance(msg["f"], list) else []
            seq, origin, keys = int(msg["s"]), str(msg["n"]), msg["k"]
            if not isinstance(keys, list):  # cjson encodes an empty table as {}
                keys = []
            generation = str(msg["g"]) if "g" in msg else None
            return seq, origin, [str(k) for k in keys], str(msg.get("a") or ""), generation
        except (ValueError, KeyError, TypeError) as exc:
            # We cannot tell what it invalidated, so anything may be stale.
            self._log.emit("bad-message", "tiercache: malformed invalidation message (%r): flushing L1", exc)
            self._flights.flush(accepting=True)
            return None

"""Stepping a sans-I/O flow by hand: no driver, no threads, no Redis, no Lua.

A :class:`Stepper` starts a flow and holds the step it yielded. The test says what that step
must be (:meth:`~Stepper.redis`, :meth:`~Stepper.call`, :meth:`~Stepper.wait`,
:meth:`~Stepper.spawn`, :meth:`~Stepper.call_with`) and answers it the way a driver would
(:meth:`~Stepper.send` a parsed reply or the function's result, :meth:`~Stepper.answer` a raw
Redis reply, :meth:`~Stepper.fail` a Redis failure, :meth:`~Stepper.throw` an exception)::

    flow = Stepper(_read.read_through(core, key, policy, True))
    flow.redis("SET", key).send(True)  # the key was empty: the lease is ours
    flow.call().send("computed")
    flow.redis(script=..., keys=[...]).answer(0)  # the fill script: refused
    assert flow.result == "computed"

An exception the flow raises comes out of the ``send``/``throw`` that caused it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import pytest

from tiercache import _remote
from tiercache._remote import RedisOp, RemoteFailure
from tiercache._steps import CallWith, Flow, Reply, Spawn, Step, Wait
from tiercache._types import CALL

__all__ = ["Stepper", "op_keys"]

R = TypeVar("R")

_UNSET: Any = object()


def op_keys(op: RedisOp) -> list[str]:
    """The Redis keys ``op`` touches, in order, each once: a script's KEYS, MGET's keys, or the
    key of each command (the first argument after the command's name), pipelined ones too."""
    keys: list[str] = []
    for args in (op.args, *op.more):
        name = str(args[0]).upper()
        if name in ("EVALSHA", "EVAL"):
            found = list(args[3 : 3 + int(args[2])])
        elif name == "MGET":
            found = list(args[1:])
        else:
            found = [args[1]]
        keys.extend(k for k in found if k not in keys)
    return keys


class Stepper(Generic[R]):
    """Runs ``flow`` one step at a time with scripted replies (see the module's docstring)."""

    def __init__(self, flow: Flow[R]) -> None:
        self._flow = flow
        #: Every step the flow yielded so far, in order.
        self.steps: list[Step] = []
        self._step: Step | None = None
        self._result: R = _UNSET
        self._advance(lambda: next(flow))

    # -- what the flow asks for ------------------------------------------------------------

    @property
    def done(self) -> bool:
        """Whether the flow returned (its value is :attr:`result`)."""
        return self._result is not _UNSET

    @property
    def step(self) -> Step:
        """The step the flow yielded and waits to be answered."""
        assert self._step is not None, f"the flow returned {self._result!r}; it yields no more steps"
        return self._step

    @property
    def op(self) -> RedisOp:
        """The pending step, which must be a Redis op."""
        op = self.step
        assert isinstance(op, RedisOp), f"expected a Redis op, the flow yielded {op!r}"
        return op

    @property
    def waiting(self) -> Wait:
        """The pending step, which must be a Wait (its signal and timeout)."""
        step = self.step
        assert isinstance(step, Wait), f"expected Wait, the flow yielded {step!r}"
        return step

    @property
    def spawned(self) -> Spawn:
        """The pending step, which must be a Spawn (the flow to run in the background)."""
        step = self.step
        assert isinstance(step, Spawn), f"expected Spawn, the flow yielded {step!r}"
        return step

    def redis(
        self, *command: object, script: _remote.Script | None = None, keys: Sequence[str] | None = None
    ) -> Stepper[R]:
        """Expect a Redis op: whose arguments start with ``command`` (e.g. ``"SET", key``),
        which runs ``script`` (by EVALSHA), and which touches exactly ``keys`` (see
        :func:`op_keys`)."""
        op = self.op
        assert op.args[: len(command)] == command, f"expected {command!r}..., the flow sent {op.args!r}"
        if script is not None:
            assert op.script is script, f"expected the script {script.sha}, the flow sent {op.args[:2]!r}"
            assert op.args[:2] == ("EVALSHA", script.sha)
        if keys is not None:
            assert op_keys(op) == list(keys), f"expected keys {list(keys)!r}, the op touches {op_keys(op)!r}"
        return self

    def call(self) -> Stepper[R]:
        """Expect CALL: the user's function is to be called."""
        assert self.step is CALL, f"expected CALL, the flow yielded {self.step!r}"
        return self

    def call_with(self, items: Sequence[Any]) -> Stepper[R]:
        """Expect a batch call (``CallWith``) of ``items``."""
        step = self.step
        assert isinstance(step, CallWith), f"expected CallWith, the flow yielded {step!r}"
        assert list(step.arg) == list(items), f"expected a call with {list(items)!r}, got {step.arg!r}"
        return self

    def wait(self, timeout: float | None = None) -> Stepper[R]:
        """Expect a Wait (for at most ``timeout`` seconds, when given)."""
        step = self.waiting
        if timeout is not None:
            assert step.timeout == pytest.approx(timeout), f"expected a wait of {timeout} s, got {step.timeout}"
        return self

    def spawn(self) -> Stepper[R]:
        """Expect a Spawn."""
        _ = self.spawned
        return self

    # -- answering it -----------------------------------------------------------------------

    def send(self, reply: Reply = None) -> Stepper[R]:
        """Answer the pending step with ``reply``: a parsed Redis reply (what the op's parser
        returns), the function's result, a Wait's outcome (None, or False: refused)."""
        _ = self.step  # (asserts that a step is pending)
        return self._advance(lambda: self._flow.send(reply))

    def answer(self, raw: object) -> Stepper[R]:
        """Answer the pending Redis op with ``raw``, as Redis would reply: parsed by the op, as
        the drivers do (a reply it cannot parse is sent as an ``UnreadableReply``)."""
        op = self.op
        try:
            reply = _remote.finish(op, raw)
        except RemoteFailure as exc:
            reply = _remote.failure(exc)
        return self.send(reply)

    def fail(self, error: BaseException | None = None) -> Stepper[R]:
        """Answer the pending Redis op with a failure (``error``, by default a lost connection),
        sent as the reply like the drivers do."""
        _ = self.op
        return self.send(_remote.failure(error if error is not None else ConnectionError("Redis is down")))

    def throw(self, error: BaseException) -> Stepper[R]:
        """Throw ``error`` into the flow at its pending step (the function raised it, or the
        caller was cancelled)."""
        _ = self.step  # (asserts that a step is pending)
        return self._advance(lambda: self._flow.throw(error))

    @property
    def result(self) -> R:
        """What the flow returned; it must have returned."""
        assert self.done, f"the flow has not returned; it waits on {self._step!r}"
        return self._result

    def _advance(self, move: Callable[[], Step]) -> Stepper[R]:
        self._step = None
        try:
            step = move()
        except StopIteration as stop:
            self._result = stop.value
            return self
        self._step = step
        self.steps.append(step)
        return self

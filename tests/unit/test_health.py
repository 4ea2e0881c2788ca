"""The subscriber's health check (``Health``), driven by a fake clock: no sockets, no sleeps."""

from __future__ import annotations

from tiercache._subscriber import Check, Health

INTERVAL = 2.0  # PING after this much silence
DEADLINE = 3.0  # give up when nothing arrives within this after the PING


def test_nothing_to_do_while_traffic_is_recent() -> None:
    health = Health(INTERVAL, DEADLINE, now=100.0)
    assert health.due() == 102.0
    assert health.step(101.9) is Check.NOTHING
    assert health.due() == 102.0


def test_ping_after_silence_and_only_one() -> None:
    health = Health(INTERVAL, DEADLINE, now=100.0)
    assert health.step(102.0) is Check.PING
    assert health.due() == 105.0, "after the PING, the next check is when its reply is overdue"
    for now in (102.0, 103.0, 104.9):  # still waiting for the reply: no second PING
        assert health.step(now) is Check.NOTHING


def test_a_reply_clears_the_ping() -> None:
    health = Health(INTERVAL, DEADLINE, now=100.0)
    assert health.step(102.5) is Check.PING
    health.heard(103.0)  # the PONG
    assert health.due() == 105.0
    assert health.step(104.9) is Check.NOTHING
    assert health.step(105.0) is Check.PING, "silence again: the next PING, not a give-up"


def test_give_up_when_nothing_arrives_within_the_deadline() -> None:
    health = Health(INTERVAL, DEADLINE, now=100.0)
    assert health.step(102.0) is Check.PING
    assert health.step(104.99) is Check.NOTHING
    assert health.step(105.0) is Check.GIVE_UP
    assert health.step(106.0) is Check.GIVE_UP, "it stays given up: the caller drops the connection"


def test_a_late_check_pings_then_gives_up_only_after_the_deadline() -> None:
    # A check that runs late (a busy process) pings at once and counts the deadline from then.
    health = Health(INTERVAL, DEADLINE, now=100.0)
    assert health.step(150.0) is Check.PING
    assert health.step(152.9) is Check.NOTHING
    assert health.step(153.0) is Check.GIVE_UP


def test_traffic_resets_the_silence() -> None:
    health = Health(INTERVAL, DEADLINE, now=100.0)
    for now in (101.0, 102.5, 104.0, 105.5):  # a message every 1.5 s: never silent for 2 s
        assert health.step(now) is Check.NOTHING
        health.heard(now)
    assert health.due() == 107.5
    assert health.step(107.5) is Check.PING


def test_traffic_before_the_ping_does_not_answer_it() -> None:
    health = Health(INTERVAL, DEADLINE, now=100.0)
    assert health.step(102.0) is Check.PING
    health.heard(101.5)  # read before the PING went out (reported late): not its reply
    assert health.step(105.0) is Check.GIVE_UP


def test_the_bound_is_interval_plus_deadline() -> None:
    # A socket that goes silent at t is given up by t + interval + deadline at the latest,
    # when the checks run at the times due() names.
    health = Health(INTERVAL, DEADLINE, now=0.0)
    now, checks = 0.0, []
    while (check := health.step(now)) is not Check.GIVE_UP:
        checks.append(check)
        now = health.due()
    assert now == INTERVAL + DEADLINE
    assert checks == [Check.NOTHING, Check.PING]

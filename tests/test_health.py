"""Start-failure accounting (speccluster_ssh.health): pure, no lab."""

from __future__ import annotations

import json

from speccluster_ssh.health import (
    ENTRY_BACKOFF_FIRST,
    FailureLedger,
    Health,
    HostState,
    is_host_specific,
    normalized_cause,
)

NAME_TAKEN = "nanny 0 failed to start: ValueError: Unexpected response from register: name taken, 0"
BAD_OPTION = "nanny 1 failed to start: ValueError: could not parse memory_limit 'plenty'"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_three_host_specific_failures_put_a_host_aside() -> None:
    ledger = FailureLedger()
    verdicts = [ledger.start_failed("1", "h2", BAD_OPTION, healthy_hosts=3) for _ in range(3)]
    assert [v.put_host_aside for v in verdicts] == [False, False, True]
    assert "3 times in a row" in verdicts[-1].message and "plenty" in verdicts[-1].message


def test_a_name_still_taken_is_never_the_hosts_fault() -> None:
    clock = Clock()
    ledger = FailureLedger(clock=clock)
    for _ in range(5):
        verdict = ledger.start_failed("0", "h2", NAME_TAKEN, healthy_hosts=4)
        assert not verdict.put_host_aside
        assert verdict.entry_retry_in > 0
        clock.now += verdict.entry_retry_in
    assert ledger.problem("0") == NAME_TAKEN
    assert not is_host_specific(NAME_TAKEN)


def test_same_failure_on_two_hosts_is_the_entrys_problem_and_restores_the_first_host() -> None:
    clock = Clock()
    ledger = FailureLedger(clock=clock)
    for _ in range(3):
        last = ledger.start_failed("1", "h2", BAD_OPTION, healthy_hosts=4)
    assert last.put_host_aside
    # Moved to h3, it fails the same way (another pid, another port): the entry is at fault.
    verdict = ledger.start_failed("1", "h3", BAD_OPTION.replace("1", "17"), healthy_hosts=3)
    assert not verdict.put_host_aside
    assert verdict.restore_hosts == ["h2"]
    assert verdict.entry_retry_in == ENTRY_BACKOFF_FIRST
    assert ledger.waiting("1")
    clock.now += ENTRY_BACKOFF_FIRST
    assert not ledger.waiting("1")
    # It keeps backing off, doubling, and never charges a host again.
    again = ledger.start_failed("1", "h3", BAD_OPTION, healthy_hosts=3)
    assert again.entry_retry_in == 2 * ENTRY_BACKOFF_FIRST and not again.put_host_aside


def test_one_entry_never_puts_more_than_half_the_healthy_hosts_aside() -> None:
    clock = Clock()
    ledger = FailureLedger(clock=clock)
    hosts = ["h1", "h2", "h3", "h4"]
    aside: set[str] = set()
    for _ in range(3):  # rounds: the entry keeps failing, with a new cause on each host
        for host in hosts:
            if host in aside:
                continue
            for attempt in range(3):
                cause = f"problem {'x' * (ord(host[1]) + 10 * attempt)}"
                verdict = ledger.start_failed("0", host, cause, healthy_hosts=len(hosts) - len(aside))
                clock.now += verdict.entry_retry_in
                aside -= set(verdict.restore_hosts)
                if verdict.put_host_aside:
                    aside.add(host)
                    break
            assert len(aside) <= len(hosts) // 2, aside
    assert len(aside) == 2
    assert ledger.problem("0")


def test_success_clears_the_streak_and_the_entrys_problem() -> None:
    ledger = FailureLedger()
    ledger.start_failed("1", "h2", BAD_OPTION, 3)
    ledger.start_failed("1", "h2", BAD_OPTION, 3)
    ledger.start_succeeded("1", "h2")
    assert not ledger.start_failed("2", "h2", BAD_OPTION, 3).put_host_aside
    assert ledger.problem("1") == ""


def test_failures_of_different_entries_on_one_host_add_up() -> None:
    ledger = FailureLedger()
    verdicts = [ledger.start_failed(key, "h2", f"disk full on entry {key}", 3) for key in ("1", "2", "3")]
    # "disk full on entry N" normalises to one cause, but each entry failed on one host only.
    assert verdicts[-1].put_host_aside


def test_normalized_cause_ignores_numbers() -> None:
    assert normalized_cause("port 37075 on 10.0.0.3 pid 0x1f") == normalized_cause("port 1 on 10.0.0.4 pid 0x2a")


def test_host_state_transitions_and_json() -> None:
    state = HostState("h1")
    assert state.state == Health.NEW and state.usable
    state.mark_up()
    state.mark_down("cannot connect", now=10.0)  # going down schedules the next attempt
    assert not state.usable and state.reason == "cannot connect"
    assert state.retry_at == 11.0 and state.backoff == 2.0
    state.mark_up()
    state.put_aside("bad")
    assert json.loads(json.dumps(state.as_dict()))["state"] == "aside"
    assert f"{state.state}" == "aside" == str(state.state)
    state.restore()
    assert state.state == Health.UP and state.reason == ""


# -- drained hosts ---------------------------------------------------------------------------------


def test_a_drained_host_is_not_usable_whatever_its_health_and_says_why() -> None:
    state = HostState("h1")
    state.mark_up()
    state.drain("  disk replacement ")
    assert not state.usable
    assert state.state == Health.UP  # draining is beside the health, not a health
    assert state.as_dict()["drained"] == "disk replacement"
    # It still goes down and comes back while drained, and stays drained.
    state.mark_down("connection lost")
    state.mark_up()
    assert not state.usable and state.drained == "disk replacement"
    state.undrain()
    assert state.usable and state.as_dict()["drained"] == ""


def test_undrain_gives_back_the_health_the_host_has_then() -> None:
    state = HostState("h1")
    state.drain("")
    assert state.drained == "drained"  # an empty reason still says something
    state.mark_down("cannot connect")
    state.undrain()
    assert state.state == Health.DOWN and not state.usable
    state.put_aside("failed three times")
    state.restore()
    assert state.usable


def test_drained_hosts_are_said_apart_from_failing_ones_in_the_summary() -> None:
    from speccluster_ssh.reporting import summarize, summary_line

    hosts = {"h1": {"state": "up", "drained": ""}, "h2": {"state": "up", "drained": "maintenance"}}
    summary = summarize(hosts, [{"status": "running"}], 1)
    assert summary["drained_hosts"] == {"h2": "maintenance"}
    assert summary["missing_hosts"] == {}
    assert summary_line(summary) == "2 of 2 hosts up, 1 of 1 workers; h2 drained: maintenance"

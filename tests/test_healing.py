"""The healer's decisions (speccluster_ssh.healing): a snapshot in, actions out; pure, no lab.

Each case is a snapshot of hosts and entries, the failed starts the ledger
already holds, and the actions one pass must plan, in order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
import pytest

from speccluster_ssh.health import ENTRY_BACKOFF_FIRST, Health
from speccluster_ssh.healing import (
    Action,
    BackOffEntry,
    ChargeStartFailure,
    DropDeadEntry,
    EntryView,
    ForgetShortEntry,
    HealingCore,
    HostView,
    MoveEntry,
    Process,
    PutHostAside,
    Reconcile,
    RestoreHost,
    RetryHost,
    Snapshot,
    StartAgainInPlace,
    is_due,
)

NOW = 100.0
BAD = "nanny failed to start: ValueError: could not parse memory_limit 'plenty'"
NAME_TAKEN = "nanny failed to start: ValueError: Unexpected response from register: name taken, 1"


def up(name: str) -> HostView:
    return HostView(name, Health.UP)


def down(name: str, retry_at: float = NOW, *, retrying: bool = False) -> HostView:
    return HostView(name, Health.DOWN, retry_at=retry_at, retrying=retrying)


def aside(name: str) -> HostView:
    return HostView(name, Health.ASIDE)


def drained(name: str) -> HostView:
    return HostView(name, Health.UP, drained=True)


def running(key: str, host: str) -> EntryView:
    return EntryView(key, host, Process.RUNNING, host, started=True)


def dead(key: str, host: str, *, on: str | None = None, started: bool = False, error: str = "") -> EntryView:
    """Entry ``key`` placed on ``host`` whose process (on ``on``, by default ``host``) failed or closed."""
    return EntryView(key, host, Process.DEAD, on or host, started=started, start_error=error)


def waiting(key: str, host: str) -> EntryView:
    """Entry ``key`` placed on ``host`` with no process yet."""
    return EntryView(key, host)


def snap(hosts: Sequence[HostView], entries: Sequence[EntryView], *, workers: Sequence[str] | None = None,
         running_: bool = True, pass_retry_at: float = 0.0) -> Snapshot:
    worker_hosts = frozenset(h.name for h in hosts) if workers is None else frozenset(workers)
    return Snapshot(tuple(hosts), worker_hosts, tuple(entries), running_, pass_retry_at)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def core_after(history: Sequence[tuple[str, str, str, int]]) -> HealingCore:
    """A core whose ledger already holds ``history``: failed starts (entry, host, cause, healthy hosts)."""
    core = HealingCore.with_clock(Clock())
    for entry, host, cause, healthy in history:
        core.failures.start_failed(entry, host, cause, healthy)
    return core


H123 = [up("h1"), up("h2"), up("h3")]
OTHER = "nanny failed to start: OSError: No space left on device"
HALF_MSG = f"entry 1 failed on h3 3 times, but it may not put more than half of the healthy hosts aside: {OTHER}"
ASIDE_MSG = f"failed to start workers 3 times in a row; last error: {BAD}"

CASES: list[tuple[str, Snapshot, list[tuple[str, str, str, int]], list[Action]]] = [
    ("nothing to do", snap(H123, [running("0", "h1"), running("1", "h2")]), [], []),
    ("no hosts, no entries", snap([], []), [], []),
    (
        "a worker that ran and died is dropped and started again in place, not charged",
        snap(H123, [running("0", "h1"), dead("1", "h2", started=True)]),
        [],
        [DropDeadEntry("1"), Reconcile()],
    ),
    (
        "a failed start on a usable host is charged to the host, with its error",
        snap(H123, [dead("1", "h2", error=BAD)]),
        [],
        [DropDeadEntry("1"), ChargeStartFailure("1", "h2", BAD, f"entry 1 failed to start on h2: {BAD}"), Reconcile()],
    ),
    (
        "a failed start without an error is charged with a plain cause",
        snap(H123, [dead("1", "h2")]),
        [],
        [
            DropDeadEntry("1"),
            ChargeStartFailure("1", "h2", "entry 1 failed to start", "entry 1 failed to start on h2: entry 1 failed to start"),
            Reconcile(),
        ],
    ),
    (
        "the third failure in a row puts the host aside and the entry moves off it",
        snap(H123, [dead("1", "h2", error=BAD)]),
        [("0", "h2", BAD, 3), ("1", "h2", BAD, 3)],
        [
            DropDeadEntry("1"),
            ChargeStartFailure("1", "h2", BAD, ASIDE_MSG),
            PutHostAside("h2", ASIDE_MSG),
            MoveEntry("1", "h2"),
            Reconcile(),
        ],
    ),
    (
        "failing the same way on a second host: the entry backs off and the host it put aside comes back",
        snap([up("h1"), aside("h2"), up("h3")], [dead("1", "h3", error=BAD)]),
        [("1", "h2", BAD, 3), ("1", "h2", BAD, 3), ("1", "h2", BAD, 3)],
        [
            DropDeadEntry("1"),
            ChargeStartFailure("1", "h3", BAD, f"entry 1 fails the same way on h2, h3: {BAD}"),
            RestoreHost("h2", "1"),
            BackOffEntry("1", ENTRY_BACKOFF_FIRST, f"entry 1 fails the same way on h2, h3: {BAD}"),
            Reconcile(),
        ],
    ),
    (
        "a host the ledger would take back but that is down now stays down",
        snap([up("h1"), down("h2", NOW + 30), up("h3")], [dead("1", "h3", error=BAD)]),
        [("1", "h2", BAD, 3), ("1", "h2", BAD, 3), ("1", "h2", BAD, 3)],
        [
            DropDeadEntry("1"),
            ChargeStartFailure("1", "h3", BAD, f"entry 1 fails the same way on h2, h3: {BAD}"),
            BackOffEntry("1", ENTRY_BACKOFF_FIRST, f"entry 1 fails the same way on h2, h3: {BAD}"),
            Reconcile(),
        ],
    ),
    (
        "a name still taken is the entry's problem, never the host's: it backs off where it is",
        snap(H123, [dead("1", "h2", error=NAME_TAKEN)]),
        [],
        [
            DropDeadEntry("1"),
            ChargeStartFailure("1", "h2", NAME_TAKEN, f"entry 1 failed to start on h2: {NAME_TAKEN}"),
            BackOffEntry("1", ENTRY_BACKOFF_FIRST, f"entry 1 failed to start on h2: {NAME_TAKEN}"),
            Reconcile(),
        ],
    ),
    (
        "one entry may not put more than half of the healthy hosts aside; the one it did stays aside",
        snap([up("h1"), aside("h2"), up("h3")], [dead("1", "h3", error=OTHER)]),
        [("1", "h2", BAD, 3), ("1", "h2", BAD, 3), ("1", "h2", BAD, 3), ("1", "h3", OTHER, 2), ("1", "h3", OTHER, 2)],
        [
            DropDeadEntry("1"),
            ChargeStartFailure("1", "h3", OTHER, HALF_MSG),
            BackOffEntry("1", ENTRY_BACKOFF_FIRST, HALF_MSG),
            Reconcile(),
        ],
    ),
    (
        "a lost host: its dead entry is not charged but moves; the host is retried when due",
        snap([up("h1"), down("h2"), up("h3")], [running("0", "h1"), dead("1", "h2", error="connection lost")]),
        [],
        [RetryHost("h2"), DropDeadEntry("1"), MoveEntry("1", "h2"), Reconcile()],
    ),
    (
        "a lost host not yet due: the entry moves, the retry waits",
        snap([up("h1"), down("h2", NOW + 4), up("h3")], [dead("1", "h2")]),
        [],
        [DropDeadEntry("1"), MoveEntry("1", "h2"), Reconcile()],
    ),
    (
        "an entry already moved to a usable host starts again there, not moved to itself",
        snap([up("h1"), down("h2", NOW + 4), up("h3")], [dead("1", "h3", on="h2")]),
        [],
        [DropDeadEntry("1"), StartAgainInPlace("1", "h3"), Reconcile()],
    ),
    (
        "an entry whose spec names a host that left the inventory moves",
        snap([up("h1"), down("h2", NOW + 4), up("h3")], [dead("1", "h9", on="h2")], workers=["h1", "h2", "h3"]),
        [],
        [DropDeadEntry("1"), MoveEntry("1", "h9"), Reconcile()],
    ),
    (
        "entries placed on a host that went down before they were created move; the running one stays",
        snap([up("h1"), down("h2", NOW + 4)], [running("0", "h1"), waiting("1", "h2"), waiting("2", "h2")]),
        [],
        [MoveEntry("1", "h2"), MoveEntry("2", "h2"), Reconcile()],
    ),
    (
        "entries of a put-aside or drained host move before they are created",
        snap([up("h1"), aside("h2"), drained("h3")], [waiting("1", "h2"), waiting("2", "h3")]),
        [],
        [MoveEntry("1", "h2"), MoveEntry("2", "h3"), Reconcile()],
    ),
    (
        "a running entry on a drained host stays (draining moves it, not the healer)",
        snap([up("h1"), drained("h2")], [running("1", "h2")]),
        [],
        [],
    ),
    (
        "an entry waiting on a usable host is started by the reconcile",
        snap(H123, [running("0", "h1"), waiting("1", "h2")]),
        [],
        [Reconcile()],
    ),
    (
        "an entry backing off is no different to the plan: the reconcile leaves it waiting",
        snap(H123, [waiting("1", "h2")]),
        [("1", "h2", NAME_TAKEN, 3)],
        [Reconcile()],
    ),
    (
        "no reconcile while the cluster is not running",
        snap([up("h1"), down("h2", NOW + 4)], [dead("1", "h1", started=True), waiting("2", "h2")], running_=False),
        [],
        [DropDeadEntry("1"), MoveEntry("2", "h2")],
    ),
    (
        "hosts due for a retry, in the pool's order",
        snap([down("h1", NOW - 5), up("h2"), down("h3", NOW)], [running("0", "h2")]),
        [],
        [RetryHost("h1"), RetryHost("h3")],
    ),
    (
        "no retry before its time, while one is in flight, or of a host nothing wants",
        snap(
            [down("h1", NOW + 0.5), down("h2", retrying=True), down("h3"), up("h4")],
            [running("0", "h4")],
            workers=["h1", "h2", "h4"],
        ),
        [],
        [],
    ),
    (
        "a host that left the inventory is still retried while an entry names it",
        snap([down("h3"), up("h4")], [running("0", "h4"), waiting("1", "h3")], workers=["h4"]),
        [],
        [RetryHost("h3"), MoveEntry("1", "h3"), Reconcile()],
    ),
    (
        "several dead entries, in spec order; a host put aside by the first is unusable for the second",
        snap(H123, [dead("0", "h2", error=BAD), dead("1", "h2", error=BAD)]),
        [("7", "h2", BAD, 3)],
        [
            DropDeadEntry("0"),
            ChargeStartFailure("0", "h2", BAD, f"entry 0 failed to start on h2: {BAD}"),
            DropDeadEntry("1"),
            ChargeStartFailure("1", "h2", BAD, ASIDE_MSG),
            PutHostAside("h2", ASIDE_MSG),
            MoveEntry("1", "h2"),
            MoveEntry("0", "h2"),
            Reconcile(),
        ],
    ),
]


@pytest.mark.parametrize(("snapshot", "history", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan(snapshot: Snapshot, history: list[tuple[str, str, str, int]], expected: list[Action]) -> None:
    assert core_after(history).plan(snapshot, NOW) == expected


def test_the_ledger_remembers_failed_starts_from_one_pass_to_the_next() -> None:
    core = core_after([])
    failing = snap(H123, [dead("1", "h2", error=BAD)])
    passes = [core.plan(failing, NOW) for _ in range(3)]
    assert [any(isinstance(a, PutHostAside) for a in p) for p in passes] == [False, False, True]


def test_a_start_that_worked_ends_the_hosts_streak() -> None:
    core = core_after([("1", "h2", BAD, 3), ("1", "h2", BAD, 3)])
    core.entry_started("1", "h2")
    assert PutHostAside("h2", ASIDE_MSG) not in core.plan(snap(H123, [dead("1", "h2", error=BAD)]), NOW)


def test_entries_that_back_off_are_waiting_until_their_time() -> None:
    clock = Clock()
    core = HealingCore.with_clock(clock)
    core.plan(snap(H123, [dead("1", "h2", error=NAME_TAKEN)]), NOW)
    assert core.waiting("1") and core.problem("1") == NAME_TAKEN
    clock.now += ENTRY_BACKOFF_FIRST
    assert not core.waiting("1")


BACKING_OFF = [("1", "h2", NAME_TAKEN, 3)]  # entry 1 waits until NOW + 2 s

DEADLINES: list[tuple[str, Snapshot, list[tuple[str, str, str, int]], float]] = [
    ("nothing to wait for", snap(H123, [running("1", "h2")]), [], math.inf),
    ("a wanted host that is down", snap([up("h1"), down("h2", NOW + 30)], [running("1", "h1")]), [], NOW + 30),
    ("a host due already", snap([up("h1"), down("h2", NOW - 1)], [running("1", "h1")]), [], NOW - 1),
    ("a host whose retry is in flight", snap([up("h1"), down("h2", NOW + 30, retrying=True)], []), [], math.inf),
    ("a host nothing wants", snap([up("h1"), down("h2", NOW + 30)], [], workers=["h1"]), [], math.inf),
    ("the earliest of two", snap([down("h1", NOW + 8), down("h2", NOW + 3)], []), [], NOW + 3),
    ("a failed pass", snap(H123, [], pass_retry_at=NOW + 1), [], NOW + 1),
    ("a failed pass after a host", snap([down("h1", NOW + 0.5)], [], pass_retry_at=NOW + 1), [], NOW + 0.5),
    ("an entry backing off", snap(H123, [waiting("1", "h2")]), BACKING_OFF, NOW + ENTRY_BACKOFF_FIRST),
    # Its dead process is still there: the pass that drops it reads the backoff anew.
    ("an entry backing off with a dead process", snap(H123, [dead("1", "h2")]), BACKING_OFF, math.inf),
    ("an entry that runs again", snap(H123, [running("1", "h2")]), BACKING_OFF, math.inf),
]


@pytest.mark.parametrize(("snapshot", "history", "expected"), [c[1:] for c in DEADLINES], ids=[c[0] for c in DEADLINES])
def test_next_deadline(snapshot: Snapshot, history: list[tuple[str, str, str, int]], expected: float) -> None:
    assert core_after(history).next_deadline(snapshot, NOW) == expected


def test_a_backoff_already_over_is_no_deadline() -> None:
    clock = Clock()
    core = HealingCore.with_clock(clock)
    core.failures.start_failed("1", "h2", NAME_TAKEN, 3)
    clock.now += ENTRY_BACKOFF_FIRST
    assert core.next_deadline(snap(H123, [waiting("1", "h2")]), clock.now) == math.inf


@pytest.mark.parametrize(
    ("host", "due"),
    [
        (down("h", NOW), True),
        (down("h", NOW - 1), True),
        (down("h", NOW + 0.001), False),
        (down("h", NOW, retrying=True), False),
        (up("h"), False),
        (aside("h"), False),
        (HostView("h", Health.NEW), False),
        (HostView("h", Health.DOWN, drained=True, retry_at=NOW), True),  # drained hosts still come back up
    ],
)
def test_the_retry_rule(host: HostView, due: bool) -> None:
    assert is_due(host, {"h"}, NOW) is due
    assert not is_due(host, set(), NOW)


def test_a_host_view_is_usable_as_a_host_state_is() -> None:
    from speccluster_ssh.health import HostState

    for health in Health:
        for is_drained in (False, True):
            state = HostState("h")
            state.state = health
            if is_drained:
                state.drain("test")
            assert HostView("h", health, drained=is_drained).usable is state.usable


def test_an_entry_that_found_no_room_leaves_the_spec_uncharged() -> None:
    """Other clusters hold its host: dropped and forgotten (the lease watcher waits for a slot), no host failure."""
    core = HealingCore()
    state = Snapshot(
        hosts=(HostView("h1"), HostView("h2")),
        worker_hosts=frozenset({"h1", "h2"}),
        entries=(
            EntryView("0", "h1", Process.DEAD, "h1", start_error="host h1: no room", lease_short=True),
            EntryView("1", "h2", Process.RUNNING, "h2", started=True),
        ),
    )
    assert core.plan(state, 0.0) == [DropDeadEntry("0"), ForgetShortEntry("0")]
    # The same entry failing for a reason of its own is charged to the host.
    failed = Snapshot(state.hosts, state.worker_hosts, (EntryView("0", "h1", Process.DEAD, "h1", start_error="boom"),))
    assert isinstance(core.plan(failed, 0.0)[1], ChargeStartFailure)

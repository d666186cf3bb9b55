"""The head's lease arithmetic (``leases.py``, issue 23): free capacity, fair share, quota. Tables, no I/O.

The last test checks that the head and the host agree: a claim the host
accepts (``agent/lease_records.py``'s ``lease_fit``) is one that fits what
:func:`free_capacity` leaves the claimer, beside what it holds already.
"""

from __future__ import annotations

from typing import Any

import pytest

from speccluster_ssh.agent.lease_records import lease_amount, lease_fit
from speccluster_ssh.leases import (
    Amount,
    Lease,
    entries_fit,
    entry_amount,
    fair_grants,
    fair_limits,
    fair_order,
    free_capacity,
    host_capacity,
    next_claimer,
    parse_user_quota,
    quota_of,
    quota_refusal,
    slots_held,
    waiting_clusters,
)

GiB = 2**30


def lease(cluster: str, user: str, slots: int = 1, host: str = "h1", *, cores: int = 0, memory: int = 0,
          gpus: tuple[str, ...] = (), since: float = 0.0) -> Lease:  # fmt: skip
    return Lease(host, "lease", user, cluster, Amount(slots, cores, memory, gpus), since)


def want(cluster: str, user: str, since: float, host: str = "h1", slots: int = 1) -> Lease:
    return Lease(host, "want", user, cluster, Amount(slots), since)


# -- capacity ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"slots": 4}, Amount(4, None, None, ())),
        ({"slots": 2, "nworkers": 2, "nthreads": 3}, Amount(2, 12, None, ())),
        ({"slots": 2, "memory_limit": 4 * GiB}, Amount(2, None, 8 * GiB, ())),
        ({"slots": 2, "memory_limit": "auto"}, Amount(2, None, None, ())),
        ({"slots": 2, "gpus": ["0", "1"]}, Amount(2, None, None, ("0", "1"))),
        ({"slots": 2, "gpus": 4}, Amount(2, None, None, ())),  # a count: the agent names the devices
        ({"slots": 0, "nthreads": 2}, Amount(0, 0, None, ())),
    ],
)
def test_host_capacity(kwargs: dict[str, Any], expected: Amount) -> None:
    assert host_capacity(**kwargs) == expected


CAP = Amount(slots=4, cores=16, memory=32 * GiB, gpus=("0", "1", "2", "3"))


@pytest.mark.parametrize(
    ("capacity", "leases", "expected"),
    [
        (CAP, [], CAP),
        # Only other clusters' leases count; wants take nothing.
        (CAP, [lease("me", "ann", 2, cores=8), want("x", "bob", 1.0, slots=3)], CAP),
        (CAP, [lease("x", "bob", 1, cores=4, memory=8 * GiB, gpus=("1",))],
         Amount(3, 12, 24 * GiB, ("0", "2", "3"))),
        (CAP, [lease("x", "bob", 3), lease("y", "cat", 2, gpus=("0", "3"))], Amount(0, 16, 32 * GiB, ("1", "2"))),
        # Unknown stays unknown, not zero.
        (Amount(2), [lease("x", "bob", 1, cores=4)], Amount(1, None, None, ())),
        (Amount(1, cores=2), [lease("x", "bob", 1, cores=4)], Amount(0, 0, None, ())),
    ],
)
def test_free_capacity(capacity: Amount, leases: list[Lease], expected: Amount) -> None:
    assert free_capacity(capacity, leases, "me") == expected


def test_a_lease_from_the_host_record() -> None:
    record = {"kind": "lease", "user": "ann", "cluster": "c1", "name": "big", "head": "desk", "entry": "3",
              "since": 5.0, "holds": {"slots": 1, "cores": 2, "memory": 0, "gpus": ["1"]}}  # fmt: skip
    got = Lease.from_record("h2", record)
    assert got == Lease("h2", "lease", "ann", "c1", Amount(1, 2, 0, ("1",)), 5.0, "big", "desk", "3")
    assert got.held and not Lease.from_record("h2", {**record, "kind": "want", "wants": {"slots": 2}}).held


# -- fair share ------------------------------------------------------------------------------------


def test_slots_held_count_users_across_hosts_and_clusters() -> None:
    leases = [lease("a1", "ann", 2, "h1"), lease("a2", "ann", 1, "h2"), lease("b", "bob", 1, "h2"), want("c", "cat", 0)]
    assert slots_held(leases) == {"ann": 3, "bob": 1}


def test_waiting_clusters_take_their_earliest_want_anywhere() -> None:
    leases = [want("a", "ann", 5.0, "h1"), want("a", "ann", 2.0, "h2"), want("b", "bob", 3.0, "h1", slots=2),
              want("b", "bob", 4.0, "h1"), want("c", "cat", 1.0, "h2")]  # fmt: skip
    got = waiting_clusters(leases, "h1")
    assert [(w.cluster, w.since, w.slots) for w in got] == [("a", 2.0, 1), ("b", 3.0, 3)]


@pytest.mark.parametrize(
    ("leases", "free", "expected"),
    [
        # No one waits.
        ([lease("a", "ann", 2)], 2, []),
        # The user holding fewer slots on the lab goes first, whatever the want times.
        ([lease("a", "ann", 3, "h2"), lease("b", "bob", 1, "h2"), want("a2", "ann", 1.0), want("b2", "bob", 9.0)],
         1, ["b2"]),
        # Freed slots alternate between two users who hold the same.
        ([want("a", "ann", 1.0, slots=3), want("b", "bob", 2.0, slots=3)], 4, ["a", "b", "a", "b"]),
        # Progressive filling: bob catches up first, then they alternate.
        ([lease("x", "ann", 2, "h9"), want("a", "ann", 1.0, slots=5), want("b", "bob", 2.0, slots=5)],
         5, ["b", "b", "a", "b", "a"]),
        # A user's two clusters share the user's place: once ann and bob hold one each, bob's want
        # (2.0) is earlier than ann's other cluster's (3.0).
        ([want("a1", "ann", 3.0), want("a2", "ann", 1.0), want("b", "bob", 2.0, slots=2)], 4, ["a2", "b", "b", "a1"]),
        # A cluster takes no more than it wants; slots may be left.
        ([want("a", "ann", 1.0, slots=1)], 3, ["a"]),
        # Equal holdings and times: the smaller cluster id.
        ([want("zz", "ann", 1.0), want("aa", "bob", 1.0)], 1, ["aa"]),
        # Wants on another host do not compete here.
        ([want("a", "ann", 1.0, "h2"), want("b", "bob", 2.0)], 2, ["b"]),
    ],
)
def test_fair_order(leases: list[Lease], free: int, expected: list[str]) -> None:
    assert fair_order(leases, "h1", free) == expected
    assert next_claimer(leases, "h1") == (expected[0] if expected else None)
    # The same records in any order give the same answer: every deployer computes it alike.
    assert fair_order(list(reversed(leases)), "h1", free) == expected


def test_fair_order_skips_users_at_their_quota() -> None:
    leases = [lease("x", "ann", 2, "h2"), want("a", "ann", 1.0, slots=3), want("b", "bob", 2.0, slots=3)]
    assert fair_order(leases, "h1", 4, {"ann": 2, "*": 3}) == ["b", "b", "b"]
    assert fair_order(leases, "h1", 4, {"bob": 1}) == ["b", "a", "a", "a"]


# -- quota -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        (8, {"*": 8}),
        (0, {"*": 0}),
        ({"ann": 4, "*": 2}, {"ann": 4, "*": 2}),
    ],
)
def test_parse_user_quota(value: Any, expected: Any) -> None:
    assert parse_user_quota(value) == expected


@pytest.mark.parametrize("value", [-1, True, "8", 2.5, {}, {"ann": -1}, {"ann": "4"}, {"": 3}, [4]])
def test_parse_user_quota_refuses(value: Any) -> None:
    with pytest.raises(ValueError, match="whole number of slots"):
        parse_user_quota(value)


@pytest.mark.parametrize(
    ("quota", "user", "slots", "refused"),
    [
        (None, "ann", 100, False),
        ({"*": 4}, "ann", 1, False),  # ann holds 3
        ({"*": 4}, "ann", 2, True),
        ({"ann": 3}, "ann", 1, True),
        ({"ann": 3}, "bob", 50, False),  # no '*': others are free
        ({"bob": 2, "*": 10}, "bob", 1, False),
        ({"bob": 1, "*": 10}, "bob", 1, True),
    ],
)
def test_quota_refusal(quota: Any, user: str, slots: int, refused: bool) -> None:
    leases = [lease("a", "ann", 2, "h1"), lease("a", "ann", 1, "h2"), lease("b", "bob", 1, "h2"), want("c", "ann", 0)]
    text = quota_refusal(quota, user, leases, slots)
    assert (text is not None) == refused
    if refused:
        assert f"of the {quota_of(quota, user)} slots speccluster_user_quota gives them" in text


# -- the head and the host agree -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("held", "asked"),
    [
        ([], {"slots": 1}),
        ([("x", 1, 0, [])], {"slots": 3}),
        ([("x", 1, 0, [])], {"slots": 4}),
        ([("me", 2, 0, []), ("x", 1, 0, [])], {"slots": 1}),
        ([("me", 2, 0, []), ("x", 1, 0, [])], {"slots": 2}),
        ([("x", 1, 10, [])], {"slots": 1, "cores": 6}),
        ([("x", 1, 10, [])], {"slots": 1, "cores": 7}),
        ([("x", 1, 0, ["0"])], {"slots": 1, "gpus": ["1", "2"]}),
        ([("x", 1, 0, ["0"])], {"slots": 1, "gpus": ["0"]}),
        ([("me", 1, 0, ["1"]), ("x", 1, 0, ["0"])], {"slots": 1, "gpus": ["1"]}),
        ([("x", 1, 0, ["0", "1", "2"])], {"slots": 1, "gpus": ["3"]}),
    ],
)
def test_the_host_accepts_what_the_head_sees_free(held: list[Any], asked: dict[str, Any]) -> None:
    capacity = {"slots": 4, "cores": 16, "memory": 0, "gpus": ["0", "1", "2", "3"]}
    records = [{"kind": "lease", "user": "u", "cluster": c, "holds": {"slots": s, "cores": k, "memory": 0, "gpus": g}}
               for c, s, k, g in held]  # fmt: skip
    amount, _ = lease_amount(asked)
    short, _, _ = lease_fit(capacity, records, amount)
    leases = [Lease.from_record("h1", r) for r in records]
    free = free_capacity(host_capacity(4, nthreads=4, gpus=capacity["gpus"]), leases, "me")
    mine = [lease for lease in leases if lease.cluster == "me"]
    fits = (
        amount["slots"] <= free.slots - sum(m.amount.slots for m in mine)
        and amount["cores"] <= (free.cores or 0) - sum(m.amount.cores or 0 for m in mine)
        and all(g in free.gpus and all(g not in m.amount.gpus for m in mine) for g in amount["gpus"])
    )
    assert fits == (not short), (short, free)


# -- what one cluster may place ------------------------------------------------------------------------


def test_entry_amount_and_what_fits() -> None:
    capacity = Amount(slots=2, cores=8, memory=16 * GiB, gpus=("0", "1", "2", "3"))
    per_entry = entry_amount(2, capacity, gpus=2)
    assert per_entry == Amount(1, 4, 8 * GiB, ("0", "1"))
    assert entries_fit(capacity, per_entry) == 2
    assert entries_fit(Amount(2, 8, 16 * GiB, ("3",)), per_entry) == 0  # one device left: no entry of two
    assert entries_fit(Amount(2, 3, 16 * GiB, ()), entry_amount(2, Amount(2))) == 2  # cores not given: not counted


def test_slots_freed_on_several_hosts_at_once_are_shared_between_the_waiting_users() -> None:
    # 4 hosts freed at the same moment, two users waiting everywhere: not all four to the earliest want.
    hosts = ("h1", "h2", "h3", "h4")
    lab = [want("a", "alice", 1.0, h) for h in hosts] + [want("b", "bob", 2.0, h) for h in hosts]
    grants = fair_grants(lab, {h: 1 for h in hosts})
    given = [c for h in hosts for c in grants[h]]
    assert sorted(given) == ["a", "a", "b", "b"]
    assert grants == {"h1": ["a"], "h2": ["b"], "h3": ["a"], "h4": ["b"]}  # ties: earliest want, then host order


def test_fair_limits_follow_fair_share_only_where_others_wait() -> None:
    one_slot = (Amount(slots=1), Amount(slots=1))
    hosts = {h: one_slot for h in ("h1", "h2", "h3")}
    # h1: root's holder; h2 free, bob waits; h3 free, no one waits.
    lab = [lease("holder", "root", host="h1"), want("mine", "alice", 5.0, "h2"), want("bobs", "bob", 1.0, "h2")]
    # h2: alice and bob hold nothing, bob waited first; h3: no one else waits, so it is alice's to take.
    assert fair_limits(hosts, lab, "mine") == {"h1": 0, "h2": 0, "h3": 1}
    assert fair_limits(hosts, lab, "bobs") == {"h1": 0, "h2": 1, "h3": 1}
    # Bob at his quota: the slot goes to alice.
    assert fair_limits(hosts, lab, "mine", {"bob": 0}) == {"h1": 0, "h2": 1, "h3": 1}
    # Its own lease counts towards what it may have.
    assert fair_limits({"h1": one_slot}, [lease("mine", "alice")], "mine") == {"h1": 1}

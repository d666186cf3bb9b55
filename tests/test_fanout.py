"""The fan-out plan of a wheelhouse (``fanout.py``): pure, any order of events."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from speccluster_ssh.fanout import HEAD, FanoutCoordinator, FanoutPlan, Source, plan_waves


def names(n: int) -> list[str]:
    return [f"h{i}" for i in range(1, n + 1)]


def test_sixteen_cold_hosts_cost_the_head_at_most_three_sends() -> None:
    waves = plan_waves(names(16))
    sources = [source for wave in waves for _, source in wave]
    assert sorted(name for wave in waves for name, _ in wave) == sorted(names(16))
    assert sum(source.is_head for source in sources) <= 3
    # The hosts holding the wheels multiply each round: 16 hosts in 3 rounds, not 8.
    assert len(waves) <= 3


def test_hosts_that_have_the_wheels_serve_first() -> None:
    waves = plan_waves(names(3), have=["old1", "old2"])
    assert [(name, source.peer) for name, source in waves[0]] == [("h1", "old1"), ("h2", "old2"), ("h3", "old1")]


def test_peers_share_the_load() -> None:
    plan = FanoutPlan(direct=1, per_peer=2)
    for name in names(7):
        plan.want(name)
    assert plan.assign() == [("h1", HEAD)]
    plan.finished("h1", ok=True, address="10.0.0.1:5000")
    second = plan.assign()
    assert [(n, s.peer) for n, s in second] == [("h2", "h1"), ("h3", "h1")]
    plan.finished("h2", ok=True, address="10.0.0.2:5000")
    # h2 has served nobody yet, h1 two: h2 is chosen first, then h1 (one fetch under way) takes the rest.
    assert [(n, s.peer) for n, s in plan.assign()] == [("h4", "h2"), ("h5", "h2"), ("h6", "h1")]


def test_failed_peer_fetch_falls_back_to_the_head() -> None:
    plan = FanoutPlan(direct=1, per_peer=4, max_peer_failures=1)
    for name in names(3):
        plan.want(name)
    plan.assign()
    plan.finished("h1", ok=True, address="a:1")
    assert {s.peer for _, s in plan.assign()} == {"h1"}
    plan.finished("h2", ok=False)
    plan.want("h2")
    assert plan.assign() == [("h2", Source(fallback=True))]
    assert plan.head_sends == 1 and plan.head_fallbacks == 1
    # h1 failed once: with max_peer_failures=1 nobody else gets it.
    plan.want("h4")
    assert plan.assign() == []  # h2 and h3 (in flight) may serve yet: h4 waits
    plan.finished("h2", ok=True)  # done, but serves nothing
    plan.finished("h3", ok=True)
    assert plan.assign() == [("h4", Source(fallback=True))]


def test_no_server_anywhere_means_the_head_sends_rather_than_waits_forever() -> None:
    plan = FanoutPlan(direct=1)
    plan.want("h1")
    plan.want("h2")
    assert plan.assign() == [("h1", HEAD)]
    assert plan.assign() == []
    plan.finished("h1", ok=True, address=None)  # its server did not start
    assert plan.assign() == [("h2", Source(fallback=True))]


def test_head_failure_is_the_hosts() -> None:
    plan = FanoutPlan()
    plan.want("h1")
    plan.assign()
    plan.finished("h1", ok=False)
    assert plan.failed == {"h1"} and plan.idle


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        FanoutPlan(direct=0)


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(0, 40),
    n_have=st.integers(0, 3),
    direct=st.integers(1, 3),
    per_peer=st.integers(1, 4),
    data=st.data(),
)
def test_any_order_of_events_ends_with_every_host_served_without_cycles(
    n: int, n_have: int, direct: int, per_peer: int, data: st.DataObject
) -> None:
    plan = FanoutPlan(direct=direct, per_peer=per_peer)
    have = [f"old{i}" for i in range(n_have)]
    for name in have:
        plan.add_peer(name, name)
    hosts = names(n)
    for name in hosts:
        plan.want(name)
    got_from: dict[str, Source] = {}
    ready_at: dict[str, int] = {name: -1 for name in have}  # step at which a host could serve
    started_at: dict[str, int] = {}
    peer_failures = 0
    silent = 0  # hosts that finished without serving
    for step in range(10_000):
        for name, source in plan.assign():
            if source.peer is not None:
                assert source.peer in ready_at and source.peer != name
            started_at[name] = step
            got_from[name] = source
        active: dict[str, int] = {}
        for source in plan.in_flight.values():
            if source.peer is not None:
                active[source.peer] = active.get(source.peer, 0) + 1
        assert all(count <= per_peer for count in active.values())
        assert plan.head_sends <= direct
        if not plan.in_flight:
            assert not plan.waiting, "hosts wait with nothing in flight: stalled"
            break
        name = data.draw(st.sampled_from(sorted(plan.in_flight)))
        source = plan.in_flight[name]
        fails = source.peer is not None and data.draw(st.booleans())
        serves = data.draw(st.booleans()) or data.draw(st.booleans())
        if fails:
            peer_failures += 1
            plan.finished(name, ok=False)
            plan.want(name)
        else:
            plan.finished(name, ok=True, address=f"{name}:1" if serves else None)
            if serves:
                ready_at[name] = step
            else:
                silent += 1
    assert plan.done == set(hosts)
    # No cycles: every host got its wheels from the head or from a host that had them before it started.
    for name in hosts:
        source = got_from[name]
        assert source.is_head or ready_at[source.peer] < started_at[name] or source.peer in have
    # Beyond its budget, the head sends only after a failed peer fetch or to replace a host that serves nothing.
    assert plan.head_fallbacks <= peer_failures + silent


@given(n=st.integers(1, 64), direct=st.integers(1, 3), per_peer=st.integers(1, 4))
def test_even_rounds_never_cost_the_head_more_than_direct(n: int, direct: int, per_peer: int) -> None:
    waves = plan_waves(names(n), direct=direct, per_peer=per_peer)
    assert sum(source.is_head for wave in waves for _, source in wave) <= direct
    assert sorted(name for wave in waves for name, _ in wave) == sorted(names(n))


def test_coordinator_serves_concurrent_starts_and_forgets_cancelled_ones() -> None:
    async def main() -> tuple[dict[str, Source], FanoutCoordinator]:
        coord = FanoutCoordinator(FanoutPlan(direct=1, per_peer=2))
        got: dict[str, Source] = {}

        async def start(name: str) -> None:
            source = await coord.source_for(name)
            got[name] = source
            await asyncio.sleep(0)
            coord.finished(name, ok=True, address=f"{name}:1")

        first = await coord.source_for("h0")
        doomed = asyncio.ensure_future(coord.source_for("gone"))
        await asyncio.sleep(0)
        assert not doomed.done()  # h0 is in flight and may serve: "gone" waits
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        assert first.is_head and "gone" not in coord.plan.waiting
        coord.finished("h0", ok=True, address="h0:1")
        # Bounded: a plan that stalls fails here instead of hanging.
        await asyncio.wait_for(asyncio.gather(*(start(name) for name in names(9))), 30)
        return got, coord

    got, coord = asyncio.run(main())
    assert set(got) == set(names(9))
    assert not any(s.is_head for s in got.values())
    assert coord.plan.idle and coord.plan.head_sends == 1

"""The address family between hosts that have both (peerfamily.py), without a lab: fake agents, no network."""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass, field
from typing import Any

import pytest

from speccluster_ssh import peerfamily
from speccluster_ssh.agent.host import _global_addresses
from speccluster_ssh.peerfamily import PeerFamily, address_of_family, other_addresses


@dataclass
class _Spec:
    is_local: bool = False


@dataclass
class _Agent:
    facts: dict[str, Any]


@dataclass
class _Table:
    specs: dict[str, _Spec]


@dataclass
class _Pool:
    agents_up: dict[str, _Agent]
    table: _Table = field(init=False)
    peer_family: PeerFamily | None = None
    head_addresses: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.table = _Table({n: _Spec() for n in self.agents_up})

    def agent_starts(self, names: list[str]) -> dict[str, asyncio.Future[_Agent]]:
        out: dict[str, asyncio.Future[_Agent]] = {}
        for name in names:
            out[name] = asyncio.get_running_loop().create_future()
            out[name].set_result(self.agents_up[name])
        return out


def _dual(i: int) -> _Agent:
    return _Agent({"listen_address": f"10.0.0.{i}", "addresses": {"4": [f"10.0.0.{i}"], "6": [f"fd00::{i}"]}})


def test_describe_and_address_of_family() -> None:
    assert PeerFamily(6, ("h1", "h2")).describe() == "IPv6 between hosts (IPv4 blocked between h1, h2)"
    assert PeerFamily(4, ("h1",)).blocked == 6
    facts = _dual(1).facts
    assert (address_of_family(facts, 6), address_of_family(facts, 4)) == ("fd00::1", "10.0.0.1")
    assert address_of_family({"addresses": {"6": []}}, 6) is None
    assert address_of_family({}, 6) is None  # an agent of an older release


def test_other_addresses_need_every_host_with_both_families() -> None:
    pool = _Pool({"h1": _dual(1), "h2": _dual(2)})
    assert other_addresses(pool, pool.agents_up) == {"h1": "fd00::1", "h2": "fd00::2"}  # type: ignore[arg-type]
    pool.agents_up["h2"].facts["addresses"] = {"4": ["10.0.0.2"], "6": []}
    assert other_addresses(pool, pool.agents_up) is None  # type: ignore[arg-type]


def test_one_family_hosts_cost_no_probe_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    async def no_probe(*args: Any, **kwargs: Any) -> dict[str, dict[str, str]]:
        raise AssertionError("probed hosts of one family")

    pool = _Pool({"h1": _dual(1), "h2": _Agent({"listen_address": "10.0.0.2", "addresses": {"4": ["10.0.0.2"]}})})
    assert asyncio.run(peerfamily.choose_at_start(pool, ["h1", "h2"], 1.0, no_probe)) is None  # type: ignore[arg-type]
    assert pool.agents_up["h1"].facts["listen_address"] == "10.0.0.1"


def _probe_by_family(blocked: int) -> Any:
    calls: list[dict[str, str] | None] = []

    async def probe(pool: Any, names: list[str], addresses: dict[str, str] | None = None) -> dict[str, dict[str, str]]:
        calls.append(addresses)
        version = ipaddress.ip_address((addresses or {})[names[0]]).version
        why = "no answer within 5 s" if version == blocked else ""
        return {n: ({p: why for p in names if p != n} if why else {}) for n in names}

    return probe, calls


def test_ipv4_blocked_between_hosts_switches_them_to_ipv6(monkeypatch: pytest.MonkeyPatch) -> None:
    probe, calls = _probe_by_family(blocked=4)
    pool = _Pool({"h1": _dual(1), "h2": _dual(2)})
    monkeypatch.setattr(peerfamily.families, "route_source", lambda address: "fd00::99")
    found = asyncio.run(peerfamily.choose_at_start(pool, ["h1", "h2"], 1.0, probe))  # type: ignore[arg-type]
    assert found == PeerFamily(6, ("h1", "h2")) and pool.peer_family == found
    assert len(calls) == 2  # the links' family, then the other one
    assert {n: a.facts["listen_address"] for n, a in pool.agents_up.items()} == {"h1": "fd00::1", "h2": "fd00::2"}
    assert pool.head_addresses == {"h1": "fd00::99", "h2": "fd00::99"}
    # A host whose agent starts later follows the choice.
    late = _dual(3)
    pool.table.specs["h3"] = _Spec()
    peerfamily.adopt(pool, "h3", late)  # type: ignore[arg-type]
    assert late.facts["listen_address"] == "fd00::3" and pool.head_addresses["h3"] == "fd00::99"


def test_both_families_blocked_or_none_keeps_the_links_family(monkeypatch: pytest.MonkeyPatch) -> None:
    probe, calls = _probe_by_family(blocked=6)  # the links' family works: one probe, nothing changes
    pool = _Pool({"h1": _dual(1), "h2": _dual(2)})
    assert asyncio.run(peerfamily.choose_at_start(pool, ["h1", "h2"], 1.0, probe)) is None  # type: ignore[arg-type]
    assert len(calls) == 1 and pool.peer_family is None and not pool.head_addresses

    async def both(pool: Any, names: list[str], addresses: dict[str, str] | None = None) -> dict[str, dict[str, str]]:
        return {n: {p: "refused" for p in names if p != n} for n in names}

    assert asyncio.run(peerfamily.choose_at_start(pool, ["h1", "h2"], 1.0, both)) is None  # type: ignore[arg-type]
    assert pool.agents_up["h1"].facts["listen_address"] == "10.0.0.1"


def test_the_agents_global_addresses_are_addresses_of_their_family() -> None:
    found = _global_addresses()
    assert set(found) == {"4", "6"}
    for version, listed in found.items():
        assert all(ipaddress.ip_address(a).version == int(version) for a in listed), found
        assert not any(ipaddress.ip_address(a).is_loopback for a in listed), found


async def _no_probe(*args: Any, **kwargs: Any) -> dict[str, dict[str, str]]:
    raise AssertionError("probed hosts of one family")


def test_the_first_host_of_one_family_ends_the_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host still starting (or down) does not hold a lab of one family up: the first hello of one family ends it."""
    pool = _Pool({"h1": _Agent({"listen_address": "10.0.0.1", "addresses": {"4": ["10.0.0.1"], "6": []}}),
                  "h2": _dual(2)})

    async def main() -> PeerFamily | None:
        never: asyncio.Future[_Agent] = asyncio.get_running_loop().create_future()
        done: asyncio.Future[_Agent] = asyncio.get_running_loop().create_future()
        done.set_result(pool.agents_up["h1"])
        monkeypatch.setattr(pool, "agent_starts", lambda names: {"h1": done, "h2": never}, raising=False)
        return await asyncio.wait_for(peerfamily.choose_at_start(pool, ["h1", "h2"], 600.0, _no_probe), 5)  # type: ignore[arg-type]

    assert asyncio.run(main()) is None

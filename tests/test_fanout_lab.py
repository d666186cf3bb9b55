"""The wheel fan-out on the lab: 8 cold hosts get a wheelhouse, the head sends it to few of them.

Each host runs the real environment script (``envbuild.py`` with
``wheelpeer.py``) over its sshd under a bare python, with an environment
directory of its own; the wheelhouse is small and made here (a stand-in
``distributed`` and a 3 MB ballast wheel), so the builds are quick and the
bytes are what is measured: how many the head sent, against the wheelhouse's
size. A count, not a timing.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import pytest
from envfakes import bare_python, fake_wheelhouse, make_wheel

import sshlab
from sshlab import Lab
from speccluster_ssh.connection import ConnectSettings, HostConnection
from speccluster_ssh.fanout import DEFAULT_DIRECT
from speccluster_ssh.inventory import load_inventory
from speccluster_ssh.peerwheels import PeerFanout
from speccluster_ssh.security import make_security
from speccluster_ssh.shipping import Wheelhouses, ensure_environment

# Its own lab of eight hosts on the session lab's prefix and subnet: it runs before the session lab exists.
pytestmark = [pytest.mark.lab, pytest.mark.lab_first]

HOSTS = 8


@pytest.fixture(scope="module")
def lab8() -> Iterator[Lab]:
    """Eight hosts, built and torn down by this module."""
    if sshlab._ACTIVE_KEYS:
        pytest.fail("this module builds its own lab and must run before the session lab starts")
    lab = Lab(HOSTS, prefix=os.environ.get("SCLAB_PREFIX", "sclab")[:9] + "8",
              subnet_base=os.environ.get("SCLAB_SUBNET", "10.250.0"))
    lab.start()
    try:
        yield lab
    finally:
        report = lab.reset()
        lab.stop()
    assert report.clean, f"the fan-out test left processes on lab hosts:\n{report}"


def test_eight_cold_hosts_cost_the_head_at_most_three_wheelhouses(lab8: Lab, tmp_path: Path) -> None:
    lab = lab8
    names = [h.name for h in lab.hosts[:HOSTS]]
    bare = bare_python(tmp_path / "bare")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    ballast = {"ballast/data.txt": os.urandom(1_500_000).hex()}  # 3 MB, stored as it is: incompressible enough
    house = fake_wheelhouse([make_wheel(wheels, "distributed", "0.0.1"), make_wheel(wheels, "ballast", "1.0", ballast)],
                            ("distributed==0.0.1", "ballast==1.0"))
    envs = tmp_path / "envs"
    host_vars = {n: {"speccluster_env_dir": str(envs / n)} for n in names}
    inventory = load_inventory(lab.write_inventory(tmp_path / "inv.yml", groups={"workers": names}, python=bare,
                                                   host_vars=host_vars,
                                                   group_vars={"all": {"speccluster_environment": "head"}}))
    settings = ConnectSettings(known_hosts=str(lab.known_hosts))
    _, tls = make_security(True, "fanout-lab")
    wheelhouses = Wheelhouses(builder=lambda request, target, cache: house, fingerprint_of=lambda r, t: house.fingerprint)
    fanout = PeerFanout(lambda: tls, cluster_id="fanout-lab")
    fanout.install(wheelhouses)
    connections = {n: HostConnection(inventory.hosts[n], settings) for n in names}

    async def one(name: str) -> str:
        async with fanout.step(name):
            return await ensure_environment(connections[name], inventory.hosts[name], wheelhouses, timeout=60)

    async def main() -> dict[str, str]:
        try:
            pythons = await asyncio.wait_for(asyncio.gather(*(one(n) for n in names)), 300)
            # The last step's end stops the servers; close() waits for that.
            await fanout.close()
            return dict(zip(names, pythons))
        finally:
            await fanout.close()
            await wheelhouses.close()
            await asyncio.gather(*(c.close() for c in connections.values()))

    pythons = asyncio.run(main())
    head = wheelhouses.stats.bytes_shipped
    from_peers = sum(fanout.peer_bytes.values())
    served = sum(s.get("bytes_sent", 0) for s in fanout.served.values())
    print(f"\nwheelhouse {house.size} B; head sent {head} B ({head / house.size:.2f}x) to "
          f"{sorted(wheelhouses.stats.shipped)}; peers sent {from_peers} B ({served} B by their own count)")
    assert all(Path(p).exists() for p in pythons.values()) and len(pythons) == HOSTS
    assert head <= 3 * house.size, f"the head sent {head / house.size:.2f} wheelhouses"
    assert len(wheelhouses.stats.shipped) <= DEFAULT_DIRECT
    # Every host got every wheel once: from the head or from a peer, and the peers' servers agree.
    assert head + from_peers == HOSTS * house.size
    assert served == from_peers
    assert set(fanout.served) and not fanout.serving, "every server was stopped"
    assert not [str(p) for p in envs.rglob(".tmp-*")], "no temporary file or half-built environment"

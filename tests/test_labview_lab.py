"""``hosts`` and ``check`` on the lab (issue 23): leases of two users' clusters, held by agents over real SSH.

Root's cluster ``alpha`` and an ordinary user's cluster ``beta`` take leases
in each lab host's own ``/var/tmp`` (the default lease directory) through
their agents; ``beta`` also waits on h1. ``hosts --json``, the ``hosts``
table and ``check`` (run as the installed command, as root) must show each
holder with its user, cluster, head, amount, free count and the busy/idle
mark its holder set.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from speccluster_ssh.agent import HeldLease, HostAgent
from speccluster_ssh.connection import ConnectSettings, HostConnection
from speccluster_ssh.inventory import load_inventory

pytestmark = pytest.mark.lab

SLOTS = 2


async def cli(where: Path, *args: str) -> tuple[int, str, str]:
    """Run ``speccluster-ssh ARGS`` in ``where`` to its end, without blocking the loop that keeps the agents alive."""
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "speccluster_ssh.cli", *args, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=str(where),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 180)
    return int(proc.returncode or 0), out.decode(), err.decode()


def table_rows(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.split("│")[1:-1]] for line in text.splitlines() if line.startswith("│")]


def test_hosts_and_check_show_two_users_leases(lab: Any, tmp_path: Path, lab_user: Any) -> None:
    user, user_python = lab_user.name, lab_user.python  # an ordinary account (tests/labusers.py)
    names = [h.name for h in lab.hosts[:3]]  # h1, h2, h3
    common = {"speccluster_slots": SLOTS}
    view = lab.write_inventory(tmp_path / "view.yml", host_vars={n: dict(common) for n in names},
                               groups={"workers": names})  # fmt: skip
    theirs = lab.write_inventory(
        tmp_path / "theirs.yml", groups={"workers": names[:2]},
        host_vars={n: {**common, "ansible_user": user, "speccluster_python": user_python} for n in names[:2]},
    )
    ours_inv, theirs_inv = load_inventory(view), load_inventory(theirs)
    settings = ConnectSettings(known_hosts=str(lab.known_hosts))
    alpha_id, beta_id = f"alpha-{os.urandom(4).hex()}", f"beta-{os.urandom(4).hex()}"

    def agent(inventory: Any, name: str, cluster: str, base_dir: str | None) -> HostAgent:
        return HostAgent(HostConnection(inventory.hosts[name], settings), cluster, base_dir=base_dir)

    async def main() -> None:
        alpha = {n: agent(ours_inv, n, alpha_id, str(tmp_path / "base")) for n in names[:2]}
        beta = {n: agent(theirs_inv, n, beta_id, None) for n in names[:2]}  # under the user's home
        everyone = [*alpha.values(), *beta.values()]
        try:
            await asyncio.gather(*(a.start() for a in everyone))
            assert {a.facts["hostname"] for a in beta.values()} == set(names[:2])
            capacity = {"slots": SLOTS}
            a1 = await alpha["h1"].lease_claim({"slots": 2}, capacity, name="alpha", head="head-a", entry="0")
            a2 = await alpha["h2"].lease_claim({"slots": 1}, capacity, name="alpha", head="head-a", entry="1")
            b2 = await beta["h2"].lease_claim({"slots": 1}, capacity, name="beta", head="head-b", entry="0")
            assert all(isinstance(x, HeldLease) for x in (a1, a2, b2)), (a1, a2, b2)
            await beta["h1"].lease_want({"slots": 1}, name="beta", head="head-b")
            assert isinstance(a1, HeldLease) and isinstance(b2, HeldLease)
            assert await alpha["h1"].lease_mark(a1.lease_id, "busy")
            assert await beta["h2"].lease_mark(b2.lease_id, "idle")

            code, out, err = await cli(tmp_path, "hosts", "view.yml", "--json")
            assert code == 0, (out, err)
            data = json.loads(out)
            hosts = {h["host"]: h for h in data["hosts"]}
            assert list(hosts) == names and all(h["reached"] for h in hosts.values()), hosts
            assert data["users"] == {"root": 3, user: 1}
            assert [(h["user"], h["cluster"], h["name"], h["head"], h["holds"]["slots"], h["state"])
                    for h in hosts["h1"]["holders"]] == [("root", alpha_id, "alpha", "head-a", 2, "busy")]
            assert [(w["user"], w["cluster"], w["wants"]["slots"]) for w in hosts["h1"]["wants"]] == [(user, beta_id, 1)]
            assert sorted((h["user"], h["cluster"], h["state"]) for h in hosts["h2"]["holders"]) == sorted(
                [("root", alpha_id, ""), (user, beta_id, "idle")]
            )
            assert [hosts[n]["free"]["slots"] for n in names] == [0, 0, 2]
            assert hosts["h3"]["holders"] == [] and hosts["h3"]["capacity"]["slots"] == SLOTS
            before = time.time()
            assert all(0 < h["since"] <= before for n in names for h in hosts[n]["holders"])

            code, out, err = await cli(tmp_path, "hosts", "view.yml")
            assert code == 0 and "Traceback" not in err, (out, err)
            print(f"\n$ speccluster-ssh hosts view.yml\n{out}")  # the README's transcript, with -s
            rows = table_rows(out)
            assert rows[0][:5] == ["h1", "2 slots", "0 slots", "root", "alpha"] and rows[0][-1].startswith("busy")
            assert rows[1][3:5] == [user, "beta"] and rows[1][-1].startswith("waiting")
            h2 = [r for r in rows if r[0] == "h2" or (r[0] == "" and rows.index(r) > 1 and r[3])][:2]
            assert {(r[3], r[4]) for r in h2} == {("root", "alpha"), (user, "beta")}, rows
            assert any(r[3] == user and r[-1].startswith("idle") for r in h2), rows
            assert [r for r in rows if r[0] == "h3"][0][2:] == ["2 slots", "", "", "", "", "", "free"]
            assert f"2 of 6 slots free; held: root 3, {user} 1; waiting: {user}" in out

            code, out, err = await cli(tmp_path, "check", "view.yml", "--timeout", "30")
            assert code == 0, (out, err)
            assert f"free now: 2 of 6 slots free; held: root 3, {user} 1; waiting: {user}" in out, out
            assert "h1: 0 of 2 slots free; held by root (alpha from head-a: 2 slots, busy); " \
                   f"{user} waits (beta: 1 slot)" in out, out
            assert "h2: 0 of 2 slots free; held by " in out and f"{user} (beta from head-b: 1 slot, idle)" in out
            checked = json.loads((await cli(tmp_path, "check", "view.yml", "--json"))[1])
            free = {r["host"]: r["free"]["slots"] for r in checked["hosts"]}
            assert free == {"h1": 0, "h2": 0, "h3": 2}
        finally:
            await asyncio.gather(*(a.close() for a in everyone), return_exceptions=True)
            for connection in {a.connection for a in everyone}:
                await connection.close()

    asyncio.run(main())

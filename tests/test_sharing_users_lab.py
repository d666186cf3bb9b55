"""Fair share between users (issue 23), on the SSH lab with two ordinary accounts besides root.

Root holds the 4 one-slot hosts; two users' clusters wait for them. Each
slot root frees goes to the waiting user who holds fewer slots on the lab
(ties: the earlier want), so the freed slots alternate between them. Every
deployer decides by the same rule from the lease files: there is no server.
"""

from __future__ import annotations

import asyncio
import json
import pwd
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from labusers import LabUser
from test_peer import holds_for, run, until
from test_sharing_lab import Sampler, cluster_on, sharing_inventory

pytestmark = pytest.mark.lab

DEADLINE = 90.0


def slots_of_users(lab: Any) -> dict[str, int]:
    """Slots each user's leases hold on the lab hosts, by user name (from the lease files' owners)."""
    held: dict[str, int] = {}
    for host in lab.hosts:
        for path in Path(host.var_tmp).glob("speccluster-lease.*.json"):
            try:
                owner = pwd.getpwuid(path.stat().st_uid).pw_name
                slots = json.loads(path.read_text())["holds"]["slots"]
            except (OSError, ValueError, KeyError):
                continue  # released while we read it
            held[owner] = held.get(owner, 0) + slots
    return held


def wanting_users(lab: Any) -> set[str]:
    """The users with a live want on some lab host."""
    return {pwd.getpwuid(p.stat().st_uid).pw_name for h in lab.hosts for p in Path(h.var_tmp).glob("speccluster-want.*.json")}


def user_up(user: LabUser, lab: Any, name: str) -> None:
    """``up --detach`` as ``user``: 4 workers asked for, none needed to start (it waits for slots)."""
    inventory = user.write_inventory(name, [h.name for h in lab.hosts], speccluster_slots=1)
    result = user.cli("up", str(inventory), "--detach", "--name", name, "--workers", "4", "--min-workers", "0",
                      "--no-tls", "--timeout", "60", timeout=150)
    assert result.returncode == 0, result.stderr[-3000:]


def test_freed_slots_alternate_between_two_waiting_users(
    lab: Any, tmp_path: Path, make_lab_user: Callable[[], LabUser]
) -> None:
    first, second = make_lab_user(), make_lab_user()
    path = sharing_inventory(lab, tmp_path, 1)

    async def main() -> None:
        async with cluster_on(lab, path, n_workers=4, name="holder") as holder:
            try:
                # One after the other: the first user's wants are the earlier ones.
                await asyncio.to_thread(user_up, first, lab, "fair")
                await until(lambda: first.name in wanting_users(lab), DEADLINE, "the first user's wants")
                await asyncio.to_thread(user_up, second, lab, "fair")
                await until(lambda: second.name in wanting_users(lab), DEADLINE, "the second user's wants")
                assert slots_of_users(lab) == {"root": 4}
                seen = []
                with Sampler(lab, 1, holder):
                    for remaining in (3, 2, 1, 0):
                        holder.scale(remaining)
                        given = 4 - remaining
                        await until(lambda: sum(n for u, n in slots_of_users(lab).items() if u != "root") == given,
                                    DEADLINE, f"{given} freed slots to be taken")
                        held = slots_of_users(lab)
                        seen.append((held.get(first.name, 0), held.get(second.name, 0)))
                # Each freed slot went to the user holding fewer; ties to the earlier want.
                assert seen == [(1, 0), (1, 1), (2, 1), (2, 2)], seen
                await holds_for(lambda: slots_of_users(lab) == {first.name: 2, second.name: 2}, 3.0, "2 and 2")
            finally:
                for user in (first, second):
                    down = await asyncio.to_thread(user.cli, "down", "--name", "fair", timeout=120)
                    assert down.returncode == 0, down.stderr[-2000:]

    run(main(), timeout=600)


def test_an_ordinary_user_s_cluster_waits_for_root_s_and_takes_the_freed_slots(lab: Any, tmp_path: Path, lab_user: LabUser) -> None:
    """8 slots: root takes 8; the user's cluster starts with 0 of 4 naming root, and reaches 4 when root scales to 4."""
    path = sharing_inventory(lab, tmp_path, 2)

    async def main() -> None:
        async with cluster_on(lab, path, n_workers=8, name="first") as first:
            with Sampler(lab, 2, first):
                inventory = lab_user.write_inventory("second", [h.name for h in lab.hosts], speccluster_slots=2)
                up = await asyncio.to_thread(
                    lab_user.cli, "up", str(inventory), "--detach", "--name", "second", "--workers", "4",
                    "--min-workers", "0", "--no-tls", "--timeout", "60", timeout=150)
                try:
                    assert up.returncode == 0, up.stderr[-3000:]
                    # It started with none, and says who holds the lab.
                    assert "0 of 0 workers; waiting for slots held by root (first from" in up.stdout, up.stdout
                    assert slots_of_users(lab) == {"root": 8}
                    first.scale(4)
                    await until(lambda: slots_of_users(lab) == {"root": 4, lab_user.name: 4}, DEADLINE,
                                "the user's cluster to take the 4 freed slots by itself")
                    status = await asyncio.to_thread(lab_user.cli, "status", "--name", "second", "--json")
                    report = json.loads(status.stdout)
                    assert report["summary"]["workers_running"] == 4, report["summary"]
                    holders = {(h["user"], h["name"]) for v in report["hosts"].values() for h in v["holders"]}
                    assert holders == {("root", "first")}, holders
                finally:
                    down = await asyncio.to_thread(lab_user.cli, "down", "--name", "second", timeout=120)
                    assert down.returncode == 0, down.stderr[-2000:]

    run(main(), timeout=400)

"""The difference ``reload`` finds between two inventories (speccluster_ssh.reload): pure, no lab."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from speccluster_ssh.errors import UserError
from speccluster_ssh.inventory import Inventory, load_inventory
from speccluster_ssh.reload import describe, diff_inventories


def hosts(*names: str, scheduler: str | None = None, **per_host: dict[str, Any]) -> Inventory:
    entries: list[dict[str, Any]] = []
    for name in names:
        entries.append({"name": name, "ansible_host": f"10.0.0.{name[1:]}", "groups": ["workers"],
                        **per_host.get(name, {})})
    if scheduler is not None:
        entries.append({"name": scheduler, "ansible_host": "10.0.0.100", "groups": ["scheduler"]})
    return Inventory.from_hosts(entries, speccluster_nthreads=1)


def test_added_removed_and_changed_hosts_with_the_variables_that_changed() -> None:
    old = hosts("h1", "h2", "h3")
    new = hosts("h1", "h3", "h4", h3={"speccluster_nthreads": 2})
    diff = diff_inventories(old, new, "inv.yml")
    assert [h.name for h in diff.added] == ["h4"]
    assert diff.removed == ("h2",)
    assert list(diff.changed) == ["h3"]
    (change,) = diff.changed["h3"]
    assert (change.name, change.old, change.new) == ("speccluster_nthreads", 1, 2)
    assert not diff.connection_changed("h3")
    data = diff.as_dict({"h2": 1, "h3": 2})
    assert data["added"] == [{"host": "h4", "slots": 1, "target": "ssh 10.0.0.4"}]
    assert data["removed"] == [{"host": "h2", "entries": 1}]
    assert data["changed"] == [{"host": "h3", "entries": 2, "variables": [
        {"name": "speccluster_nthreads", "old": 1, "new": 2, "shown": True}]}]
    assert describe(data) == [
        "host h4: added, 1 slot(s), ssh 10.0.0.4; entries may be placed there",
        "host h2: removed; drained first (its 1 entry moves to free slots), then its agent and connection are closed",
        "host h3: changed speccluster_nthreads: 1 -> 2; its 2 entries are replaced, 1 at a time",
    ]


def test_the_same_inventory_is_no_difference() -> None:
    diff = diff_inventories(hosts("h1", "h2"), hosts("h1", "h2"))
    assert diff.empty
    assert describe(diff.as_dict()) == ["no worker host was added, removed or changed"]


def test_connection_variables_count_and_secrets_are_not_shown() -> None:
    old = hosts("h1", "h2")
    new = hosts("h1", "h2", h1={"ansible_port": 2222}, h2={"ansible_password": "hunter2"})
    diff = diff_inventories(old, new)
    assert diff.connection_changed("h1") and diff.connection_changed("h2")
    lines = describe(diff.as_dict())
    assert "ansible_port: (unset) -> 2222" in lines[0]
    assert "ansible_password (value not shown)" in lines[1]
    assert "hunter2" not in " ".join(lines) + str(diff.as_dict())


def test_a_group_variable_changes_every_host_of_the_group() -> None:
    old = Inventory.from_hosts([{"name": n, "groups": ["workers"]} for n in ("a", "b")], speccluster_nthreads=1)
    new = Inventory.from_hosts([{"name": n, "groups": ["workers"]} for n in ("a", "b")], speccluster_nthreads=3)
    assert sorted(diff_inventories(old, new).changed) == ["a", "b"]


def test_a_host_leaving_the_worker_group_or_given_no_slot_is_removed() -> None:
    old = hosts("h1", "h2", "h3")
    new = Inventory.from_hosts([
        {"name": "h1", "ansible_host": "10.0.0.1", "groups": ["workers"]},
        {"name": "h2", "ansible_host": "10.0.0.2", "groups": ["other"]},
        {"name": "h3", "ansible_host": "10.0.0.3", "groups": ["workers"], "speccluster_slots": 0},
    ], speccluster_nthreads=1)
    assert diff_inventories(old, new).removed == ("h2", "h3")


@pytest.mark.parametrize(
    ("new", "words"),
    [
        (lambda: hosts("h1", scheduler="s2"), "from s1 to s2"),
        (lambda: hosts("h1"), "from s1 to the head"),
        (lambda: Inventory.from_hosts(
            [{"name": "h1", "ansible_host": "10.0.0.1", "groups": ["workers"]},
             {"name": "s1", "ansible_host": "10.0.0.100", "groups": ["scheduler"], "speccluster_scheduler_port": 9999}],
            speccluster_nthreads=1), "speccluster_scheduler_port"),
    ],
)
def test_the_scheduler_cannot_move_or_change(new: Any, words: str) -> None:
    with pytest.raises(UserError) as info:
        diff_inventories(hosts("h1", scheduler="s1"), new(), "inv.yml")
    message = str(info.value)
    assert words in message and "inv.yml" in message and "down" in message
    assert "\n" not in message


def test_no_worker_host_left_is_refused() -> None:
    with pytest.raises(UserError, match="no worker host is left"):
        diff_inventories(hosts("h1"), hosts("h1", h1={"speccluster_slots": 0}), "inv.yml")


def test_files_with_group_vars_give_the_same_difference(tmp_path: Path) -> None:
    path = tmp_path / "inv.yml"
    path.write_text("workers:\n  hosts:\n    a: {ansible_host: 10.0.0.1}\n    b: {ansible_host: 10.0.0.2}\n")
    old = load_inventory(path)
    (tmp_path / "group_vars").mkdir()
    (tmp_path / "group_vars" / "workers.yml").write_text("speccluster_nworkers: 2\n")
    diff = diff_inventories(old, load_inventory(path))
    assert sorted(diff.changed) == ["a", "b"]
    assert diff.changed["a"][0].new == 2


def test_adapt_bounds_follow_the_hosts_a_reload_adds() -> None:
    """adapt's maximum was capped at the capacity of the time; a reload works it out again from what was asked."""
    import math
    from types import SimpleNamespace

    from speccluster_ssh.scaling import Capacity

    two, three = hosts("h1", "h2"), hosts("h1", "h2", "h3")
    cluster = SimpleNamespace(worker_hosts={h.name: h for h in two.worker_hosts}, log_event=lambda message: None)
    capacity = Capacity(cluster)  # type: ignore[arg-type]
    adaptive = SimpleNamespace()
    adaptive.minimum, adaptive.maximum = capacity.adapt_bounds(1, math.inf)
    assert (adaptive.minimum, adaptive.maximum) == (1, 2)
    cluster.worker_hosts = {h.name: h for h in three.worker_hosts}
    capacity.refresh_adapt(adaptive)
    assert (adaptive.minimum, adaptive.maximum) == (1, 3)
    # A maximum the user asked for stays the user's.
    adaptive.minimum, adaptive.maximum = capacity.adapt_bounds(0, 2)
    cluster.worker_hosts["h4"] = hosts("h4").worker_hosts[0]
    capacity.refresh_adapt(adaptive)
    assert adaptive.maximum == 2


def test_a_refused_host_stays_as_it_runs_in_the_adopted_inventory() -> None:
    """A host whose new agent was refused keeps its old variables: the next reload finds its change again."""
    from speccluster_ssh.reload import in_effect

    old = hosts("h1", "h2", "h3")
    new = hosts("h1", "h3", "h4", h1={"speccluster_nthreads": 2}, h3={"speccluster_nthreads": 3})
    adopted = in_effect(old, new, {"h3"})
    assert [h.name for h in adopted.worker_hosts] == ["h1", "h3", "h4"]
    assert adopted.hosts["h3"] is old.hosts["h3"] and adopted.hosts["h1"] is new.hosts["h1"]
    # What the reload did is not found again; what it could not do is.
    again = diff_inventories(adopted, new)
    assert not again.added and not again.removed and list(again.changed) == ["h3"]
    assert [(c.name, c.old, c.new) for c in again.changed["h3"]] == [("speccluster_nthreads", 1, 3)]
    # Nothing refused: the new inventory itself; the old one is untouched.
    assert in_effect(old, new, ()) is new
    assert old.hosts["h3"].vars["speccluster_nthreads"] == 1 and len(new.worker_hosts) == 3

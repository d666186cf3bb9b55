"""Unit tests of the inventory model: ranges, values, precedence, host model, roles."""

from __future__ import annotations

import dataclasses
import json
import os
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from speccluster_ssh.inventory import (
    SPECCLUSTER_VARS,
    HostSpec,
    Inventory,
    InventoryError,
    expand_host_pattern,
    expand_ranges,
    hosts_table_rows,
    load_inventory,
    parse_ini_value,
    speccluster_vars_markdown,
)
from speccluster_ssh.units import format_bytes, parse_bytes

CORPUS = Path(__file__).parent / "inventories"


def write(root: Path, files: dict[str, str]) -> Path:
    """Write files under ``root`` and return the path of the first one."""
    first = None
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
        first = first or path
    assert first is not None
    return first


# -- host ranges ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "names"),
    [
        ("node[01:03]", ["node01", "node02", "node03"]),
        ("node[8:11]", ["node8", "node9", "node10", "node11"]),
        ("n[001:003]x", ["n001x", "n002x", "n003x"]),
        ("host-[a:c]", ["host-a", "host-b", "host-c"]),
        ("big[X:Z]", ["bigX", "bigY", "bigZ"]),
        ("across[y:B]", ["acrossy", "acrossz", "acrossA", "acrossB"]),
        ("odd[1:9:2]", ["odd1", "odd3", "odd5", "odd7", "odd9"]),
        ("e[00:12:4]", ["e00", "e04", "e08", "e12"]),
        ("l[a:g:3]", ["la", "ld", "lg"]),
        ("r[1:2]-n[a:b]", ["r1-na", "r1-nb", "r2-na", "r2-nb"]),
        ("plain", ["plain"]),
        ("10.0.0.[1:3]", ["10.0.0.1", "10.0.0.2", "10.0.0.3"]),
        ("z[:2]", ["z0", "z1", "z2"]),
    ],
)
def test_expand_ranges(pattern: str, names: list[str]) -> None:
    assert expand_ranges(pattern) == names


@pytest.mark.parametrize(
    ("pattern", "names", "port"),
    [
        ("node01", ["node01"], None),
        ("node01:2222", ["node01"], 2222),
        ("node[1:2]:2200", ["node1", "node2"], 2200),
        ("192.0.2.1:22", ["192.0.2.1"], 22),
        ("[2001:db8::1]:2201", ["2001:db8::1"], 2201),
        ("2001:db8::1", ["2001:db8::1"], None),
        ("db.example.org:5432", ["db.example.org"], 5432),
        # not a valid host name before the colon: ansible keeps the text whole
        ("bad_:22", ["bad_:22"], None),
    ],
)
def test_expand_host_pattern_ports(pattern: str, names: list[str], port: int | None) -> None:
    assert expand_host_pattern(pattern) == (names, port)


@pytest.mark.parametrize(
    ("pattern", "words"),
    [
        ("node[05:01]", ["node[05:01]", "greater"]),
        ("node[a:3]", ["node[a:3]", "letters and digits"]),
        ("node[01:100]", ["differ in length"]),
        ("node[1:3", ["unbalanced"]),
        ("node[1:5:0]", ["step"]),
        ("node[c:a]", ["comes after"]),
        ("node[1:]", ["no end"]),
        ("node[1:2:3:4]", ["begin:end"]),
    ],
)
def test_bad_ranges_raise(pattern: str, words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        expand_ranges(pattern)
    for word in words:
        assert word in str(info.value)


@given(st.integers(0, 500), st.integers(0, 40), st.integers(1, 7), st.integers(1, 4))
def test_numeric_ranges_property(begin: int, span: int, step: int, width: int) -> None:
    end = begin + span
    text_begin, text_end = str(begin).zfill(width), str(end).zfill(width)
    pattern = f"h[{text_begin}:{text_end}:{step}]"
    padded = text_begin.startswith("0") and len(text_begin) > 1
    if padded and len(text_end) != len(text_begin):
        with pytest.raises(ValueError):
            expand_ranges(pattern)
        return
    expected = [f"h{str(i).zfill(len(text_begin) if padded else 0)}" for i in range(begin, end + 1, step)]
    assert expand_ranges(pattern) == expected


# -- INI values ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("42", 42),
        ("-7", -7),
        ("1.5", 1.5),
        ("1e3", 1000.0),
        ("0x10", 16),
        ("1_000", 1000),
        ("True", True),
        ("None", None),
        ("'42'", "42"),
        ('"two words"', "two words"),
        ("two words", "two words"),
        ("FALSE", "FALSE"),
        ("true", "true"),
        ("[1, 'a']", [1, "a"]),
        ("1,2", [1, 2]),
        ("{'k': (1, 2)}", {"k": [1, 2]}),
        ("...", "..."),
        ("3+4j", "(3+4j)"),
        ("b'raw'", "raw"),
        ("/usr/bin/python3", "/usr/bin/python3"),
        ("", ""),
    ],
)
def test_parse_ini_value(text: str, value: object) -> None:
    assert parse_ini_value(text) == value
    assert type(parse_ini_value(text)) is type(value)


def test_ini_host_lines_and_vars_sections_type_values(tmp_path: Path) -> None:
    inv = load_inventory(
        write(
            tmp_path,
            {
                "hosts.ini": """\
                [g]
                h1 a="1" b='x y' c=[1,2] # comment
                [g:vars]
                d="1"
                e=1
                f = spaced out
                """
            },
        )
    )
    assert inv.hosts["h1"].vars == {"a": 1, "b": "x y", "c": [1, 2], "d": "1", "e": 1, "f": "spaced out"}


# -- format detection ------------------------------------------------------------------------


def test_extensionless_files_are_yaml_or_ini(tmp_path: Path) -> None:
    yaml_inv = write(tmp_path / "y", {"hosts": "all:\n  hosts:\n    y1:\n      v: 1\n"})
    ini_inv = write(tmp_path / "i", {"hosts": "i1 v=1\n[g]\ni2\n"})
    assert list(load_inventory(yaml_inv).hosts) == ["y1"]
    inv = load_inventory(ini_inv)
    assert list(inv.hosts) == ["i1", "i2"]
    assert inv.groups["g"].hosts == ("i2",)


def test_yml_file_with_ini_content_falls_back_to_ini_like_ansible(tmp_path: Path) -> None:
    inv = load_inventory(write(tmp_path, {"inv.yml": "[web]\nw1 x=1\n"}))
    assert inv.hosts["w1"].vars == {"x": 1}
    assert inv.hosts["w1"].groups == ("web",)


def test_empty_inventory_has_no_hosts(tmp_path: Path) -> None:
    for name, text in [("a.yml", ""), ("b.ini", "# nothing\n"), ("c", "---\n"), ("d.yml", "[]\n")]:
        inv = load_inventory(write(tmp_path, {name: text}))
        assert inv.hosts == {}
        assert inv.worker_hosts == []
        assert inv.scheduler_host is None
        assert inv.to_ansible_list() == {"_meta": {"hostvars": {}}, "all": {"children": ["ungrouped"]}}


def test_empty_yaml_mapping_becomes_a_host_like_in_ansible(tmp_path: Path) -> None:
    # ansible's yaml plugin rejects an empty document, then the ini plugin
    # reads "{}" as a host name; we do the same but say so
    inv = load_inventory(write(tmp_path, {"inv.yml": "{}\n"}))
    assert list(inv.hosts) == ["{}"]
    assert any("read as INI" in w for w in inv.warnings)


def test_directory_source_reads_files_in_order_and_skips_ignored(tmp_path: Path) -> None:
    inv = load_inventory(CORPUS / "directory_source" / "inventory")
    assert list(inv.hosts) == ["web1", "web2", "db1", "web3"]
    assert inv.hosts["web3"].vars == {"http_port": 80}
    assert inv.hosts["db1"].vars == {}


def test_host_list_string() -> None:
    inv = load_inventory("a,b:2222,")
    assert list(inv.hosts) == ["a", "b"]
    assert inv.hosts["b"].port == 2222
    assert inv.path is None


# -- variable precedence -------------------------------------------------------------------------


def test_deeper_group_wins_then_priority_then_name(tmp_path: Path) -> None:
    inv = load_inventory(
        write(
            tmp_path,
            {
                "inv.yml": """\
                all:
                  vars: {v: all, only_all: 1}
                  children:
                    parent:
                      vars: {v: parent}
                      children:
                        child:
                          vars: {v: child}
                          hosts: {h1: }
                    bbb:
                      vars: {same: bbb}
                      hosts: {h1: , h2: }
                    aaa:
                      vars: {same: aaa}
                      hosts: {h1: , h2: }
                    prio:
                      vars: {same: prio, ansible_group_priority: 0}
                      hosts: {h2: }
                """
            },
        )
    )
    h1, h2 = inv.hosts["h1"].vars, inv.hosts["h2"].vars
    assert h1["v"] == "child"  # depth 2 beats depth 1 beats all
    assert h1["only_all"] == 1
    assert h1["same"] == "bbb"  # same depth: merged by name, bbb last
    assert h2["same"] == "bbb"  # priority 0 sorts prio first, so it loses
    assert inv.groups["child"].depth == 2
    assert inv.groups["prio"].priority == 0
    assert "ansible_group_priority" not in h2


def test_files_beside_the_inventory_follow_ansible_order() -> None:
    inv = load_inventory(CORPUS / "precedence_files_vs_inventory" / "inventory.yml")
    h1, h2 = inv.hosts["h1"].vars, inv.hosts["h2"].vars
    # group_vars/all.yml beats even the child group's inventory vars
    assert h1["level"] == "all-file"
    assert h1["x_all_inv"] == "all-file"
    # inventory host vars beat every group_vars file
    assert h1["x"] == "host-inventory"
    # host_vars files beat everything
    assert h2["x"] == "h2-host-file"


def test_group_vars_directory_merges_sorted_files() -> None:
    inv = load_inventory(CORPUS / "group_vars_dirs" / "inventory.yml")
    w1, w2 = inv.hosts["w1"].vars, inv.hosts["w2"].vars
    # host_vars/w1/ (a.json then b.yml) beats the group directory
    assert w1["order"] == "host-dir"
    assert w1["from_json_dir"] == [1, 2, 3]
    # an inventory host var beats group_vars files
    assert w2["order"] == "inventory"
    # every allowed file of group_vars/web/ was read, hidden/backup/.txt ones were not
    assert w2["base"] is True and w2["no_extension_in_dir"] == 1 and w2["nested"] == 1
    dumped = json.dumps(inv.to_ansible_list())
    for skipped in ("hidden-must-be-skipped", "backup-must-be-skipped", "txt-must-be-skipped"):
        assert skipped not in dumped


def test_group_vars_directory_order_is_sorted_and_recursive(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "inv.ini": "[g]\nh\n",
            "group_vars/g/b.yml": "v: b\n",
            "group_vars/g/a.yml": "v: a\nonly_a: 1\n",
            "group_vars/g/c/z.yml": "v: c/z\n",
        },
    )
    assert load_inventory(tmp_path / "inv.ini").hosts["h"].vars == {"v": "c/z", "only_a": 1}


def test_extensionless_vars_file_wins_over_yml() -> None:
    inv = load_inventory(CORPUS / "vars_noext" / "inventory.yml")
    assert inv.hosts["alpha"].vars == {"from": "no-extension file"}
    assert inv.hosts["beta"].vars["beta_json_without_extension"] is True


def test_dict_values_are_replaced_not_merged() -> None:
    inv = load_inventory(CORPUS / "dict_vars_replace" / "inventory.yml")
    assert inv.hosts["h1"].vars["settings"] == {"d": 4}
    assert inv.hosts["h2"].vars["settings"] == {"b": {"other": 2}}


def test_port_from_pattern_is_only_taken_the_first_time() -> None:
    inv = load_inventory(CORPUS / "yaml_port_patterns" / "inventory.yml")
    assert inv.hosts["withport.example.org"].port == 2022
    assert inv.hosts["override"].port == 2024
    assert inv.hosts["2001:db8::5"].port == 2201
    assert inv.hosts["plain.example.org"].port is None


def test_unsafe_and_vault_values_render_like_ansible(tmp_path: Path) -> None:
    inv = load_inventory(
        write(
            tmp_path,
            {
                "inv.yml": """\
                all:
                  hosts:
                    h:
                      t: !unsafe '{{ x }}'
                      secret: !vault |
                        $ANSIBLE_VAULT;1.1;AES256
                        3132
                """
            },
        )
    )
    hostvars = inv.to_ansible_list()["_meta"]["hostvars"]["h"]
    assert hostvars["t"] == {"__ansible_unsafe": "{{ x }}"}
    assert hostvars["secret"] == {"__ansible_vault": "$ANSIBLE_VAULT;1.1;AES256\n3132\n"}


def test_internal_variables_are_dropped(tmp_path: Path) -> None:
    inv = load_inventory(write(tmp_path, {"h.ini": "h1 inventory_hostname=x group_names=y keep=1\n"}))
    assert inv.hosts["h1"].vars == {"keep": 1}


def test_warnings_for_skipped_yaml_keys() -> None:
    inv = load_inventory(CORPUS / "yaml_string_sections" / "inventory.yml")
    assert any("comment" in w and "odd_keys" in w for w in inv.warnings)
    assert inv.hosts["v1"].vars == {"flag_without_value": None}


# -- host model ------------------------------------------------------------------------------------


def test_connection_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    inv = load_inventory(
        write(
            tmp_path,
            {
                "inv.yml": """\
                all:
                  hosts:
                    full:
                      ansible_host: 10.0.0.5
                      ansible_port: "2222"
                      ansible_user: admin
                      ansible_ssh_private_key_file: ~/.ssh/lab
                      ansible_ssh_common_args: -o ProxyJump=bastion -o "StrictHostKeyChecking no"
                      ansible_python_interpreter: /usr/bin/python3.11
                    bare:
                    aliases:
                      ansible_host: a
                      ansible_ssh_host: b
                      ansible_ssh_user: u
                      ansible_connection: paramiko
                    laptop:
                      ansible_connection: ansible.builtin.local
                      ansible_python_interpreter: auto_silent
                """
            },
        )
    )
    full = inv.hosts["full"]
    assert (full.address, full.port, full.user) == ("10.0.0.5", 2222, "admin")
    assert full.key_file == os.path.join(str(tmp_path), ".ssh", "lab")
    assert full.ssh_common_args == ("-o", "ProxyJump=bastion", "-o", "StrictHostKeyChecking no")
    assert full.python == "/usr/bin/python3.11"
    assert full.connection == "ssh" and not full.is_local
    bare = inv.hosts["bare"]
    assert (bare.address, bare.port, bare.user, bare.key_file) == ("bare", None, None, None)
    assert bare.python == "python3" and bare.ssh_common_args == ()
    aliases = inv.hosts["aliases"]
    assert (aliases.address, aliases.user, aliases.connection) == ("b", "u", "ssh")
    laptop = inv.hosts["laptop"]
    assert laptop.is_local and laptop.connection == "local"
    assert laptop.python == "python3"


def test_speccluster_defaults() -> None:
    host = Inventory.from_hosts(["h"]).hosts["h"]
    assert host.nworkers == 1
    assert host.nthreads is None
    assert host.memory_limit == "auto"
    assert host.worker_class == "nanny"
    assert host.slots == 1
    assert host.resources == {} and host.env == {} and host.worker_options == {}
    assert host.prologue is None and host.local_directory is None and host.interface is None
    assert host.scheduler_port == 0 and host.dashboard_port is None
    assert host.known_hosts == "strict"
    assert host.connect_timeout == 10.0
    assert host.venv is None
    assert host.groups == ("ungrouped",)


def test_speccluster_values_are_validated_and_normalised() -> None:
    inv = load_inventory(CORPUS / "speccluster_vars" / "inventory.yml")
    gpu = inv.hosts["gpu1"]
    assert gpu.nworkers == 4 and gpu.nthreads == 2
    assert gpu.memory_limit == 8 * 2**30
    assert gpu.python == "/opt/venvs/dask/bin/python"
    assert gpu.prologue == "module load gcc\nulimit -n 8192"
    assert gpu.resources == {"GPU": 2.0}
    assert gpu.env == {"OMP_NUM_THREADS": "1", "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    assert gpu.worker_options == {"lifetime": "1h"}
    assert gpu.interface == "ib0" and gpu.local_directory == "/scratch/dask"
    assert gpu.known_hosts == "accept-new" and gpu.connect_timeout == 20.0
    head = inv.hosts["head"]
    assert head.scheduler_port == 8786 and head.dashboard_port == 8787
    assert head.python == "python3"
    assert inv.scheduler_host is head
    assert [h.name for h in inv.worker_hosts] == ["cpu1", "cpu2", "gpu1"]  # spare has 0 slots


@pytest.mark.parametrize(
    ("variables", "field", "value"),
    [
        ({"speccluster_memory_limit": "500MB"}, "memory_limit", 500_000_000),
        ({"speccluster_memory_limit": 4e9}, "memory_limit", 4_000_000_000),
        ({"speccluster_memory_limit": "AUTO"}, "memory_limit", "auto"),
        ({"speccluster_nworkers": "3"}, "nworkers", 3),
        ({"speccluster_worker_class": "Worker"}, "worker_class", "worker"),
        ({"speccluster_prologue": "source /etc/profile"}, "prologue", "source /etc/profile"),
        ({"speccluster_python": "/opt/py/bin/python", "speccluster_venv": "/v"}, "python", "/opt/py/bin/python"),
        ({"speccluster_venv": "/v/", "ansible_python_interpreter": "/usr/bin/python3"}, "python", "/v/bin/python"),
        ({"speccluster_slots": 0}, "slots", 0),
        ({"speccluster_connect_timeout": "2.5"}, "connect_timeout", 2.5),
        ({"speccluster_dashboard_port": None}, "dashboard_port", None),
        ({"speccluster_env": {"A": 1, "B": 2.5}}, "env", {"A": "1", "B": "2.5"}),
    ],
)
def test_speccluster_value_forms(variables: dict[str, object], field: str, value: object) -> None:
    host = Inventory.from_hosts([{"name": "h", **variables}]).hosts["h"]
    assert getattr(host, field) == value


def test_templated_python_interpreter_falls_back_with_warning() -> None:
    inv = Inventory.from_hosts([{"name": "localhost", "ansible_python_interpreter": "{{ ansible_playbook_python }}"}])
    assert inv.hosts["localhost"].python == "python3"
    assert any("ansible_python_interpreter" in w for w in inv.warnings)


def test_hostspec_is_frozen_and_hashable() -> None:
    host = Inventory.from_hosts([{"name": "h", "speccluster_resources": {"GPU": 1}}]).hosts["h"]
    assert isinstance(host, HostSpec)
    with pytest.raises(dataclasses.FrozenInstanceError):
        host.nworkers = 3  # type: ignore[misc]
    assert hash(host) == hash(dataclasses.replace(host))
    assert {host: 1}[host] == 1


def test_speccluster_vars_table() -> None:
    assert len(SPECCLUSTER_VARS) == 36  # 26, six of machines that sleep (issue 25), four of shipped environments (issue 24)
    for name, spec in SPECCLUSTER_VARS.items():
        assert name.startswith("speccluster_")
        assert spec.doc and "\n" not in spec.doc
        if spec.default is not None:
            # every default must pass its own validator unchanged
            assert spec.validator(spec.default) == spec.default
    table = speccluster_vars_markdown()
    assert all(f"`{name}`" in table for name in SPECCLUSTER_VARS)


# -- from_hosts and roles ---------------------------------------------------------------------------


def test_from_hosts_strings_mappings_and_group_vars() -> None:
    inv = Inventory.from_hosts(
        [
            "10.0.0.1",
            {"name": "n[1:2]", "ansible_host": "192.0.2.9", "speccluster_nworkers": 2},
            {"name": "s", "groups": "scheduler"},
        ],
        speccluster_memory_limit="2 GiB",
    )
    assert list(inv.hosts) == ["10.0.0.1", "n1", "n2", "s"]
    assert inv.hosts["n2"].nworkers == 2 and inv.hosts["n2"].address == "192.0.2.9"
    assert inv.hosts["10.0.0.1"].memory_limit == 2 * 2**30
    assert inv.scheduler_host is not None and inv.scheduler_host.name == "s"
    assert [h.name for h in inv.worker_hosts] == ["10.0.0.1", "n1", "n2"]
    assert inv.path is None
    listing = inv.to_ansible_list()
    assert listing["all"]["children"] == ["ungrouped", "scheduler"]
    assert listing["ungrouped"]["hosts"] == ["10.0.0.1", "n1", "n2"]


def test_from_hosts_validates_like_files() -> None:
    with pytest.raises(InventoryError, match="did you mean speccluster_nworkers"):
        Inventory.from_hosts(["a"], speccluster_nworker=2)
    with pytest.raises(InventoryError, match="speccluster_slots on host b must be an integer >= 0"):
        Inventory.from_hosts([{"name": "b", "speccluster_slots": -1}])
    with pytest.raises(InventoryError, match="has no 'name'"):
        Inventory.from_hosts([{"ansible_host": "x"}])


def test_workers_group_selects_workers() -> None:
    inv = Inventory.from_hosts(
        [
            {"name": "head", "groups": ["scheduler", "workers"]},
            {"name": "w1", "groups": ["workers"]},
            {"name": "idle"},
        ]
    )
    assert inv.scheduler_host is not None and inv.scheduler_host.name == "head"
    assert [h.name for h in inv.worker_hosts] == ["head", "w1"]
    rows = {r["name"]: r for r in hosts_table_rows(inv)}
    assert (rows["head"]["role"], rows["w1"]["role"], rows["idle"]["role"]) == ("both", "worker", "-")


def test_without_groups_every_host_works_and_scheduler_is_local() -> None:
    inv = Inventory.from_hosts(["a", "b"])
    assert inv.scheduler_host is None
    assert [h.name for h in inv.worker_hosts] == ["a", "b"]


def test_scheduler_group_counts_descendant_hosts_and_custom_names(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {
            "inv.ini": """\
            [brain:children]
            head_nodes
            [head_nodes]
            h0
            [muscle]
            m1
            m2 speccluster_slots=3
            [other]
            o1
            """
        },
    )
    inv = load_inventory(path, scheduler_group="brain", worker_group="muscle")
    assert inv.scheduler_host is not None and inv.scheduler_host.name == "h0"
    assert [h.name for h in inv.worker_hosts] == ["m1", "m2"]
    assert inv.hosts_in_group("brain") == [inv.hosts["h0"]]
    default = load_inventory(path)
    assert default.scheduler_host is None
    assert [h.name for h in default.worker_hosts] == ["h0", "m1", "m2", "o1"]


def test_hosts_table_rows_fields() -> None:
    inv = load_inventory(CORPUS / "yaml_basic" / "inventory.yml")
    rows = hosts_table_rows(inv)
    assert [r["name"] for r in rows] == ["laptop", "head", "w1", "w2"]
    w2 = rows[3]
    assert w2 == {
        "name": "w2",
        "address": "10.0.0.12",
        "port": 2222,
        "user": "lab",
        "key": None,
        "python": "python3",
        "connection": "ssh",
        "role": "worker",
        "nworkers": 2,
        "nthreads": None,
        "memory_limit": "auto",
        "slots": 1,
        "resources": {},
    }
    # a workers group exists and the laptop is not in it
    assert rows[0]["connection"] == "local" and rows[0]["role"] == "-"
    assert rows[1]["role"] == "scheduler"
    json.dumps(rows)  # must be JSON-serialisable


def test_groups_model(tmp_path: Path) -> None:
    inv = load_inventory(CORPUS / "ini_nested_children" / "inventory.ini")
    assert inv.groups["europe"].children == ("france", "germany")
    assert inv.groups["lyon"].parents == ("france",)
    assert inv.groups["lyon"].depth == 3
    assert inv.hosts["lyon-2"].groups == ("europe", "france", "lyon")
    assert inv.hosts["lyon-2"].vars["level"] == "host"
    assert inv.hosts["lyon-1"].vars["level"] == "lyon"
    assert inv.hosts["berlin-1"].vars == {"level": "europe", "from_europe": 1}


# -- units --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [("4 GiB", 4 * 2**30), ("500MB", 500_000_000), (4e9, 4_000_000_000), ("1.5 kB", 1500), (2048, 2048),
     ("4e9", 4_000_000_000), ("10 mib", 10 * 2**20), ("1_000 B", 1000)],
)
def test_parse_bytes(text: str | int | float, size: int) -> None:
    assert parse_bytes(text) == size


@pytest.mark.parametrize("bad", ["MB", "-1 GB", "4 XB", True, float("inf"), -5, "four", None])
def test_parse_bytes_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_bytes(bad)  # type: ignore[arg-type]


@given(st.integers(0, 2**50), st.sampled_from(["B", "kB", "KiB", "MB", "MiB", "GiB"]))
def test_parse_bytes_units_property(number: int, unit: str) -> None:
    factor = {"B": 1, "kB": 1000, "KiB": 1024, "MB": 10**6, "MiB": 2**20, "GiB": 2**30}[unit]
    assert parse_bytes(f"{number} {unit}") == number * factor


def test_format_bytes() -> None:
    assert format_bytes(4 * 2**30) == "4.00 GiB"
    assert format_bytes(123) == "123 B"


def test_playbook_variables_are_accepted_and_ignored(tmp_path: Path) -> None:
    from speccluster_ssh.agent import agent_argv

    path = tmp_path / "inv.yml"
    path.write_text(
        "all:\n  vars:\n    speccluster_wheelhouse: /srv/wheels\n    speccluster_keep_venv: true\n"
        "  hosts:\n    n1:\n      speccluster_python: ~/venv/bin/python\n"
    )
    inv = load_inventory(path)
    host = inv.hosts["n1"]
    assert host.vars["speccluster_wheelhouse"] == "/srv/wheels"
    # "~/" cannot expand inside a quoted remote command; the command starts in $HOME.
    assert agent_argv(host, "c")[2] == "venv/bin/python"
    path.write_text("all:\n  hosts:\n    n1:\n      speccluster_wheelhous: /srv\n")
    with pytest.raises(InventoryError, match="did you mean speccluster_wheelhouse"):
        load_inventory(path)


def test_lease_variables_are_checked_when_the_inventory_is_read() -> None:
    inv = Inventory.from_hosts([{"name": "a", "speccluster_user_quota": {"alice": 4, "*": 2},
                                 "speccluster_yield_after": "2m", "speccluster_lease_dir": "/srv/leases"}])
    host = inv.worker_hosts[0]
    assert (host.user_quota, host.yield_after, host.lease_dir) == ({"alice": 4, "*": 2}, 120.0, "/srv/leases")
    with pytest.raises(InventoryError, match="speccluster_user_quota"):
        Inventory.from_hosts([{"name": "a", "speccluster_user_quota": -1}])

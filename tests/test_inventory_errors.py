"""Bad inventories give one-line InventoryError messages that say what, where and how to fix."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from speccluster_ssh.inventory import Inventory, InventoryError, load_inventory

# name of the file -> (content, location prefix expected in the message, words expected in it)
BAD_INVENTORIES: dict[str, tuple[str, str, list[str]]] = {
    "yaml_syntax.yml": (
        """\
        all:
          hosts:
            a:
           b: 1
        """,
        "yaml_syntax.yml:4: ",
        ["YAML syntax error", "indentation"],
    ),
    "yaml_tab.yaml": ("all:\n\thosts: {}\n", "yaml_tab.yaml:2: ", ["YAML syntax error"]),
    "vars_syntax.yml": (
        """\
        all:
          vars:
            x: [1, 2
        """,
        "vars_syntax.yml:",
        ["YAML syntax error"],
    ),
    "ini_unknown_section_type.ini": ("[web:hosts2]\na\n", "ini_unknown_section_type.ini:1: ", ["unknown type", "[web:vars]"]),
    "ini_bad_section.ini": ("a\n[bad section]\n", "ini_bad_section.ini:2: ", ["invalid section header", "no spaces"]),
    "ini_missing_equals.ini": ("[web]\n\nh1 novalue\n", "ini_missing_equals.ini:3: ", ["key=value", "'novalue'", "h1"]),
    "ini_open_quote.ini": ('[web]\nh1 a="x\n', "ini_open_quote.ini:2: ", ["quotes"]),
    "ini_undefined_child.ini": ("[a:children]\nb\n", "ini_undefined_child.ini:2: ", ["[a:children]", "'b'", "never defined"]),
    "ini_undefined_vars_group.ini": ("[x:vars]\nk=1\n", "ini_undefined_vars_group.ini:1: ", ["[x:vars]", "never defined"]),
    "ini_vars_without_equals.ini": ("[g]\nh\n[g:vars]\njustaword\n", "ini_vars_without_equals.ini:4: ", ["key=value", "[g:vars]"]),
    "ini_text_after_header.ini": (
        "[web]\nw1\n[web:vars] ; note\nx=1\n",
        "ini_text_after_header.ini:3: ",
        ["after section header [web:vars]", "'#' comment"],
    ),
    "ini_port_colon.ini": ("h1:\n", "ini_port_colon.ini:1: ", ["ends with ':'", "port"]),
    "unknown_var.yml": (
        """\
        all:
          hosts:
            node01:
              speccluster_nworker: 2
        """,
        "unknown_var.yml:4: ",
        ["unknown variable speccluster_nworker", "host node01", "did you mean speccluster_nworkers?"],
    ),
    "unknown_group_var.ini": (
        "[w]\nh\n[w:vars]\nspeccluster_memlimit=4GB\n",
        "unknown_group_var.ini:4: ",
        ["speccluster_memlimit", "group w", "did you mean speccluster_memory_limit?"],
    ),
    "wrong_type.yml": (
        """\
        all:
          hosts:
            node03:
              speccluster_nworkers: two
        """,
        "wrong_type.yml:4: ",
        ["speccluster_nworkers on host node03 must be a positive integer, got 'two'"],
    ),
    "wrong_unit.ini": (
        "node01 speccluster_memory_limit='4 XB'\n",
        "wrong_unit.ini:1: ",
        ["speccluster_memory_limit on host node01", "'4 XB'", "'4 GiB'"],
    ),
    "group_var_wrong_type.yml": (
        """\
        all:
          vars:
            speccluster_slots: many
          hosts:
            h1:
        """,
        "group_var_wrong_type.yml:3: ",
        ["speccluster_slots on host h1", "integer >= 0", "'many'"],
    ),
    "bad_choice.ini": ("h speccluster_known_hosts=yes\n", "bad_choice.ini:1: ", ["speccluster_known_hosts", "'accept-new'", "'yes'"]),
    "bad_port_number.ini": ("h speccluster_scheduler_port=70000\n", "bad_port_number.ini:1: ", ["0 to 65535", "70000"]),
    "bad_resources.yml": (
        "all:\n  vars:\n    speccluster_resources: [GPU]\n  hosts:\n    h:\n",
        "bad_resources.yml:3: ",
        ["speccluster_resources on host h", "mapping"],
    ),
    "bad_env_name.yml": (
        "all:\n  hosts:\n    h:\n      speccluster_env: {'BAD-NAME': 1}\n",
        "bad_env_name.yml:4: ",
        ["speccluster_env", "BAD-NAME"],
    ),
    "range_backwards.ini": ("[w]\nnode[05:01]\n", "range_backwards.ini:2: ", ["node[05:01]", "greater", "[01:05]"]),
    "range_mixed.yml": ("all:\n  hosts:\n    node[a:3]:\n", "range_mixed.yml:3: ", ["node[a:3]", "letters and digits"]),
    "range_padding.ini": ("n[01:100]\n", "range_padding.ini:1: ", ["n[01:100]", "length"]),
    "cycle.yml": (
        """\
        all:
          children:
            a:
              children:
                b:
                  children:
                    a:
        """,
        "cycle.yml:",
        ["cycle a -> b -> a", "own ancestor"],
    ),
    "cycle.ini": (
        "[a:children]\nb\n[b:children]\nc\n[c:children]\na\n",
        "cycle.ini:6: ",
        ["cycle c -> a -> b -> c"],
    ),
    "self_child.ini": ("[a:children]\na\n[a]\n", "self_child.ini:2: ", ["'a' lists itself"]),
    "two_schedulers.yml": (
        """\
        all:
          children:
            scheduler:
              hosts:
                s1:
                s2:
        """,
        "two_schedulers.yml: ",
        ["'scheduler'", "s1, s2", "exactly one"],
    ),
    "bad_connection.yml": (
        "all:\n  hosts:\n    h:\n      ansible_connection: winrm\n",
        "bad_connection.yml:4: ",
        ["ansible_connection on host h", "'winrm'", "ssh", "local"],
    ),
    "bad_ansible_port.ini": ("h ansible_port=abc\n", "bad_ansible_port.ini:1: ", ["ansible_port on host h", "'abc'"]),
    "vaulted.yml": (
        "all:\n  hosts:\n    h:\n      speccluster_python: !vault |\n        $ANSIBLE_VAULT;1.1;AES256\n        3132\n",
        "vaulted.yml:4: ",
        ["speccluster_python on host h", "vault", "clear text"],
    ),
    "templated.yml": (
        "all:\n  hosts:\n    h:\n      ansible_host: '{{ inventory_hostname }}.lab'\n",
        "templated.yml:4: ",
        ["ansible_host on host h", "template"],
    ),
    "int_host.yml": ("all:\n  hosts:\n    12:\n", "int_host.yml:3: ", ["host 12", "string", "quotes"]),
    "hosts_list.yml": ("all:\n  hosts:\n    - a\n    - b\n", "hosts_list.yml:2: ", ["'hosts'", "mapping", "list"]),
    "host_vars_string.yml": ("all:\n  hosts:\n    a: oops\n", "host_vars_string.yml:3: ", ["variables of host 'a'", "mapping"]),
    "plugin.yml": ("plugin: amazon.aws.aws_ec2\nregions: [eu-west-1]\n", "plugin.yml:1: ", ["inventory plugin", "aws_ec2"]),
    "inv.toml": ("[all]\n", "inv.toml: ", ["TOML", "not supported"]),
    "bad_priority.ini": ("[g]\nh\n[g:vars]\nansible_group_priority=high\n", "bad_priority.ini:4: ", ["ansible_group_priority", "'high'"]),
    "scalar.yml": ("just a string\n", "scalar.yml:1: ", ["mapping of group names", "string"]),
}


def check_one_line(exc: InventoryError) -> str:
    message = str(exc)
    assert "\n" not in message and "\r" not in message, message
    assert message == message.strip()
    return message


@pytest.mark.parametrize("name", sorted(BAD_INVENTORIES))
def test_bad_inventory(name: str, tmp_path: Path) -> None:
    content, prefix, words = BAD_INVENTORIES[name]
    path = tmp_path / name
    path.write_text(textwrap.dedent(content))
    with pytest.raises(InventoryError) as info:
        load_inventory(path)
    message = check_one_line(info.value)
    assert message.startswith(f"{path.parent}/{prefix}"), message
    for word in words:
        assert word in message, (word, message)


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yml"
    with pytest.raises(InventoryError) as info:
        load_inventory(missing)
    message = check_one_line(info.value)
    assert str(missing) in message and "not found" in message and "check the path" in message


@pytest.mark.parametrize(
    ("files", "prefix", "words"),
    [
        ({"group_vars/web.yml": "- a\n- b\n"}, "group_vars/web.yml: ", ["mapping", "list"]),
        ({"group_vars/web.yml": "x: 1\nspeccluster_nworkrs: 2\n"}, "group_vars/web.yml:2: ", ["group web", "did you mean speccluster_nworkers?"]),
        ({"group_vars/web/10.yml": "x: [1\n"}, "group_vars/web/10.yml:2: ", ["YAML syntax error"]),
        ({"host_vars/w1.yml": "speccluster_memory_limit: lots\n"}, "host_vars/w1.yml:1: ", ["speccluster_memory_limit on host w1", "'lots'"]),
        ({"host_vars/w1.json": '{"speccluster_nthread": 2}'}, "host_vars/w1.json: ", ["host w1", "did you mean speccluster_nthreads?"]),
    ],
)
def test_bad_vars_files(tmp_path: Path, files: dict[str, str], prefix: str, words: list[str]) -> None:
    inventory = tmp_path / "inventory.ini"
    inventory.write_text("[web]\nw1\n")
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    with pytest.raises(InventoryError) as info:
        load_inventory(inventory)
    message = check_one_line(info.value)
    assert message.startswith(f"{tmp_path}/{prefix}"), message
    for word in words:
        assert word in message, (word, message)


def test_messages_use_the_path_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lab").mkdir()
    (tmp_path / "lab" / "hosts.ini").write_text("[w]\nh speccluster_nworkers=0\n")
    with pytest.raises(InventoryError) as info:
        load_inventory("lab/hosts.ini")
    assert str(info.value).startswith("lab/hosts.ini:2: speccluster_nworkers on host h must be a positive integer")


def test_from_hosts_errors_name_the_entry() -> None:
    with pytest.raises(InventoryError) as info:
        Inventory.from_hosts(["ok", 42])  # type: ignore[list-item]
    message = check_one_line(info.value)
    assert "host entry #2" in message and "'name'" in message
    with pytest.raises(InventoryError) as info:
        Inventory.from_hosts(["n[3:1]"])
    assert "host entry #1" in check_one_line(info.value) and "n[3:1]" in str(info.value)
    with pytest.raises(InventoryError) as info:
        Inventory.from_hosts([{"name": "x", "ansible_connection": "docker"}])
    assert "ansible_connection on host x" in check_one_line(info.value)


def test_empty_inventory_is_not_an_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.yml"
    path.write_text("")
    inv = load_inventory(path)
    assert inv.hosts == {} and inv.worker_hosts == []


def test_inventory_error_is_one_line_even_for_multiline_input() -> None:
    exc = InventoryError("first line\n  second line\r\nthird")
    assert str(exc) == "first line second line third"

"""No injection: values reach remote processes as data, never as shell code.

The only shell on the way to a host is the one sshd runs the command string
with; these tests put arbitrary strings through exactly that hop (``/bin/sh
-c`` on :func:`remote_command`) and through the prologue wrapper, and check
that each value arrives unchanged or is refused, and that nothing runs.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from speccluster_ssh.connection import remote_command
from speccluster_ssh.errors import UserError

SHELLY = st.sampled_from(["'", '"', "$(touch CANARY)", "`touch CANARY`", ";touch CANARY", "&& touch CANARY", "\n", "\\", "$HOME", "*", "|", ">", "<", "#", "~", " ", "\t", "!", "{a,b}", "%s", "\x00", "é", "\udcff"])
PAYLOAD = st.lists(st.one_of(SHELLY, st.text(max_size=8)), max_size=6).map("".join)

# printf writes each argument followed by a NUL: cheap enough for hundreds of examples.
ECHO_ARGV = ["/usr/bin/printf", "%s\\0"]


def scaled(n: int) -> int:
    """``n`` examples under a profile of 100 (default, ci); ten times as many under "nightly"."""
    return max(1, n * settings.default.max_examples // 100)


def through_login_shell(argv: list[str], cwd: Path) -> list[str]:
    command = remote_command(argv)
    result = subprocess.run(["/bin/sh", "-c", command], capture_output=True, cwd=cwd, timeout=30, check=True)
    return [os.fsdecode(part) for part in result.stdout.split(b"\0")[:-1]]


# The rule when one argv has both problems: NUL wins, whatever the order of
# the elements and whether they are in one value or in two.
NUL_AND_NOT_UTF8 = [["\udcff", "\x00"], ["\x00", "\udcff"], ["\udcff\x00"], ["\x00\udcff"], ["ok", "\udcffa", "b\x00"]]


@pytest.mark.parametrize("values", NUL_AND_NOT_UTF8)
def test_nul_wins_over_invalid_utf8(values: list[str]) -> None:
    with pytest.raises(UserError, match="NUL"):
        remote_command(ECHO_ARGV + values)


def test_invalid_utf8_alone_is_refused_as_such() -> None:
    with pytest.raises(UserError, match="UTF-8"):
        remote_command([*ECHO_ARGV, "ok", "\udcff"])


@settings(max_examples=scaled(300), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(PAYLOAD, min_size=1, max_size=3))
@example(values=["\udcff", "\x00"])  # the falsifying example of issue 14
@example(values=["\x00", "\udcff"])
def test_argv_survives_the_remote_shell(values: list[str], tmp_path: Path) -> None:
    canary = tmp_path / "CANARY"
    values = [v.replace("CANARY", str(canary)) for v in values]
    encodable = all(_encodable(v) for v in values)
    # The rule remote_command implements: NUL anywhere is refused first, then
    # anything that is not UTF-8; only clean values reach the shell.
    if any("\x00" in v for v in values):
        with pytest.raises(UserError, match="NUL"):
            remote_command(ECHO_ARGV + values)
    elif not encodable:
        with pytest.raises(UserError, match="UTF-8"):
            remote_command(ECHO_ARGV + values)
    else:
        assert through_login_shell(ECHO_ARGV + values, tmp_path) == values
    assert not canary.exists()


@settings(max_examples=scaled(100), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=PAYLOAD)
def test_prologue_wrapper_passes_argv_untouched(value: str, tmp_path: Path) -> None:
    canary = tmp_path / "CANARY"
    value = value.replace("CANARY", str(canary))
    if "\x00" in value or not _encodable(value):
        return
    # The same wrapper connection.open_channel uses: the prologue is data ($1).
    script = 'eval "$1" >&2 || exit 97; shift; exec "$@"'
    argv = ["/bin/sh", "-c", script, "speccluster-prologue", "export SC_TEST=1", *ECHO_ARGV, value]
    assert through_login_shell(argv, tmp_path) == [value]
    assert not canary.exists()


def _encodable(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


TEXT_VARS = ("speccluster_python", "speccluster_local_directory", "speccluster_interface", "speccluster_prologue")


@settings(max_examples=scaled(200), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=PAYLOAD, var=st.sampled_from([*TEXT_VARS, "env", "resource", "ansible_host", "ansible_user"]))
def test_inventory_values_arrive_unchanged_or_are_refused(value: str, var: str, tmp_path: Path) -> None:
    """Every string an inventory can carry comes out of the model as the same string."""
    import yaml

    from speccluster_ssh.agent import agent_argv
    from speccluster_ssh.inventory import InventoryError, load_inventory

    if "\x00" in value or not _encodable(value):
        return  # YAML cannot carry these; remote_command's refusal is tested above
    host_vars: dict[str, object] = {"speccluster_python": "/usr/bin/python3"}
    if var == "env":
        host_vars["speccluster_env"] = {"PAYLOAD": value}
    elif var == "resource":
        host_vars["speccluster_resources"] = {value or "r": 1}
    else:
        host_vars[var] = value
    path = tmp_path / "inv.yml"
    path.write_text(yaml.safe_dump({"all": {"hosts": {"n1": host_vars}}}))
    try:
        host = load_inventory(path).hosts["n1"]
    except InventoryError as exc:
        assert "\n" not in str(exc)  # refused with one line
        return
    seen = {
        "env": lambda: host.env["PAYLOAD"],
        "resource": lambda: next(iter(host.resources)),
        "ansible_host": lambda: host.address,
        "ansible_user": lambda: host.user,
        "speccluster_python": lambda: host.python,
        "speccluster_local_directory": lambda: host.local_directory,
        "speccluster_interface": lambda: host.interface,
        "speccluster_prologue": lambda: host.prologue,
    }[var]()
    expected = (value or "r") if var == "resource" else value
    if var == "speccluster_python" and value.startswith("~/"):
        expected = value
    # A blank optional value means "not set"; anything else must come through exactly.
    assert seen == expected or (not value.strip() and seen in (None, "")), (seen, value)
    if var == "speccluster_python" and value and not value.startswith("~/"):
        # The python path is the one user value on the SSH command line: one word, unchanged.
        assert through_login_shell([*ECHO_ARGV, *agent_argv(host, "c")[2:3]], tmp_path) == [value]

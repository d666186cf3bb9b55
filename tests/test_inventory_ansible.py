"""Compare our inventory reader with the real ``ansible-inventory --list``.

Every directory under ``tests/inventories/`` is one case; its source is the
entry whose name starts with ``inventory`` (a file, or a directory for
directory sources).  ansible-core is the oracle: it must be installed (it is
part of the ``test`` extra), and its absence fails the tests instead of
skipping them, so a green run always means "checked against ansible".
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from speccluster_ssh.inventory import load_inventory

CORPUS = Path(__file__).parent / "inventories"
CASES = sorted(p.name for p in CORPUS.iterdir() if p.is_dir())
# comma-separated host lists go through ansible's host_list plugin
HOST_LISTS = ["alpha,beta:2222, gamma ,10.0.0.1:22,node[1:2],", "single,"]
INSTALL_HINT = "install the test extra: pip install -e '.[test]' (it provides ansible-core)"


def case_source(case: str) -> Path:
    """The inventory source of a corpus case."""
    entries = sorted(p for p in (CORPUS / case).iterdir() if p.name.startswith("inventory"))
    if len(entries) != 1:
        raise AssertionError(f"corpus case {case} must hold exactly one 'inventory*' entry, found {entries}")
    return entries[0]


def find_ansible_inventory() -> str:
    """Path of ``ansible-inventory``; fails (never skips) the test when missing."""
    exe = shutil.which("ansible-inventory")
    if exe is None:
        pytest.fail(f"ansible-inventory is not on PATH; {INSTALL_HINT}", pytrace=False)
    return exe


def oracle_env(home: Path) -> dict[str, str]:
    """A clean environment: no user ansible.cfg or ANSIBLE_* settings leak in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update(
        ANSIBLE_CONFIG=str(home / "ansible.cfg"),
        ANSIBLE_HOME=str(home),
        ANSIBLE_LOCAL_TEMP=str(home / "tmp"),
        ANSIBLE_INVENTORY_UNPARSED_WARNING="False",
        ANSIBLE_LOCALHOST_WARNING="False",
        # a source ansible cannot parse must not pass as an empty inventory
        ANSIBLE_INVENTORY_ANY_UNPARSED_IS_FAILED="True",
        ANSIBLE_DEPRECATION_WARNINGS="False",
        ANSIBLE_NOCOLOR="1",
    )
    return env


def run_oracle(exe: str, source: str, home: Path) -> dict[str, Any]:
    """``ansible-inventory -i SOURCE --list`` as a dict, without ``_meta.profile``."""
    # cwd is an empty directory: ansible also reads group_vars/ of the cwd
    proc = subprocess.run(
        [exe, "-i", source, "--list"],
        cwd=home,
        env=oracle_env(home),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"ansible-inventory failed on {source} ({proc.returncode}):\n{proc.stderr}")
    result = json.loads(proc.stdout)
    result["_meta"].pop("profile", None)
    return result


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], dict[str, Any]]]:
    """Start every oracle run at once (two at a time) and hand out results on demand."""
    exe = find_ansible_inventory()
    home = tmp_path_factory.mktemp("ansible-home")
    (home / "tmp").mkdir()
    (home / "ansible.cfg").write_text("[defaults]\n")  # empty: ansible's defaults only
    sources = [str(case_source(c)) for c in CASES] + HOST_LISTS
    pool = ThreadPoolExecutor(max_workers=2)
    futures: dict[str, Future[dict[str, Any]]] = {s: pool.submit(run_oracle, exe, s, home) for s in sources}
    try:
        yield lambda source: futures[source].result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 28, CASES
    for case in CASES:
        assert case_source(case).exists()


def test_missing_ansible_inventory_fails_instead_of_skipping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    with pytest.raises(pytest.fail.Exception, match="install the test extra"):
        find_ansible_inventory()


@pytest.mark.parametrize("case", CASES)
def test_matches_ansible_inventory_list(case: str, oracle: Callable[[str], dict[str, Any]]) -> None:
    source = str(case_source(case))
    expected = oracle(source)
    got = load_inventory(source).to_ansible_list()
    # compare groups first: a smaller diff when membership is wrong
    assert {k: v for k, v in got.items() if k != "_meta"} == {k: v for k, v in expected.items() if k != "_meta"}
    assert got["_meta"] == expected["_meta"]


@pytest.mark.parametrize("host_list", HOST_LISTS)
def test_host_list_matches_ansible(host_list: str, oracle: Callable[[str], dict[str, Any]]) -> None:
    assert load_inventory(host_list).to_ansible_list() == oracle(host_list)


def test_corpus_output_is_not_trivial(oracle: Callable[[str], dict[str, Any]]) -> None:
    # guard against an oracle that silently returns empty inventories
    expected = oracle(str(case_source("yaml_nested_children")))
    assert expected["_meta"]["hostvars"]["lyon-2"]["level"] == "host"
    assert expected["_meta"]["hostvars"]["lyon-1"]["level"] == "lyon"
    assert expected["all"]["children"] == ["ungrouped", "europe"]


# -- the same building blocks, checked in-process against ansible's own functions ------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from speccluster_ssh.inventory import expand_ranges, parse_ini_value  # noqa: E402
from speccluster_ssh.inventory._patterns import split_port  # noqa: E402


class AnsibleParts:
    """ansible-core's own parsing helpers, imported once."""

    def __init__(self) -> None:
        try:
            from ansible._internal._datatag._tags import Origin
            from ansible.parsing.utils.addresses import parse_address
            from ansible.plugins.inventory import expand_hostname_range
            from ansible.plugins.inventory.ini import InventoryModule
        except ImportError as exc:  # pragma: no cover - depends on the environment
            pytest.fail(f"cannot import ansible-core ({exc}); {INSTALL_HINT}", pytrace=False)
        self.ini = InventoryModule()
        self.ini._origin = Origin(path="/inventory.ini", line_num=1)
        self.parse_address = parse_address
        self.expand_hostname_range = expand_hostname_range


@pytest.fixture(scope="module")
def ansible_parts() -> AnsibleParts:
    return AnsibleParts()


def shape(value: Any) -> Any:
    """Value with its exact kind, so that 1, 1.0 and True compare different."""
    if isinstance(value, bool) or value is None:
        return (type(value).__name__, value)
    for kind in (int, float, str):
        if isinstance(value, kind):
            return (kind.__name__, kind(value))
    if isinstance(value, list):
        return ("list", [shape(v) for v in value])
    if isinstance(value, dict):
        return ("dict", sorted((repr(shape(k)), shape(v)) for k, v in value.items()))
    return ("other", repr(value))


INI_VALUES = st.one_of(
    st.text(alphabet="0123456789abejxTrueNonFls.,'\"[]{}()+-_: ", max_size=14),
    st.sampled_from(["True", "None", "1,2", "b'x'", "3+4j", "...", "{'a': (1, 2)}", "[1, [2, 'x']]", "0x1F", "1e5"]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=INI_VALUES)
def test_ini_values_match_ansible(ansible_parts: AnsibleParts, text: str) -> None:
    try:
        expected = shape(ansible_parts.ini._parse_value(text))
    except Exception:  # noqa: BLE001 - any failure of ansible must be a failure of ours
        with pytest.raises(ValueError):
            parse_ini_value(text)
        return
    assert shape(parse_ini_value(text)) == expected


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet="ab19f0.:[]-_x", min_size=1, max_size=16))
def test_port_splitting_matches_ansible(ansible_parts: AnsibleParts, text: str) -> None:
    try:
        expected = ansible_parts.parse_address(text, allow_ranges=True)
    except Exception:  # noqa: BLE001 - ansible then keeps the whole text, without port
        expected = (text, None)
    assert split_port(text) == expected


RANGE_BOUND = st.one_of(st.integers(0, 30).map(str), st.sampled_from(["00", "01", "05", "007", "010", "a", "c", "z", "B"]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    head=st.sampled_from(["", "n", "node-", "10.0.0."]),
    begin=RANGE_BOUND,
    end=RANGE_BOUND,
    step=st.one_of(st.none(), st.integers(1, 4)),
    tail=st.sampled_from(["", "-x", ".lab", "-[1:2]"]),
)
def test_ranges_match_ansible(
    ansible_parts: AnsibleParts, head: str, begin: str, end: str, step: int | None, tail: str
) -> None:
    pattern = f"{head}[{begin}:{end}{'' if step is None else f':{step}'}]{tail}"
    try:
        expected = ansible_parts.expand_hostname_range(pattern)
    except Exception:  # noqa: BLE001
        expected = []
    if not expected:
        # ansible fails or silently yields nothing; we refuse the range
        with pytest.raises(ValueError):
            expand_ranges(pattern)
    else:
        assert expand_ranges(pattern) == expected

"""The ``speccluster_*`` inventory variables: one table of names, validators, defaults and docs.

:data:`SPECCLUSTER_VARS` is the single source of truth: each row also makes
one field of :class:`~speccluster_ssh.inventory.HostSpec` (named by
:func:`field_name`), and a row marked ``request`` travels with every start
request of the host's dask processes (see ``HostSpec.request_vars``). The
README table is generated from it with :func:`speccluster_vars_markdown`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from ._badvalue import BadValue
from ._values import (
    positive_int,
    non_negative_int,
    optional_positive_int,
    memory_limit,
    _choice,
    worker_class,
    resources,
    non_empty_str,
    optional_str,
    env,
    prologue,
    _port,
    positive_number,
    options_mapping,
    dask_config,
    gpus,
    log_max_bytes,
    log_retention,
    user_quota,
    requirements_list,
    head_path,
    cpu_list,
    power_command,
    optional_duration,
)

__all__ = [
    "PREFIX",
    "SPECCLUSTER_VARS",
    "BadValue",
    "VarSpec",
    "field_name",
    "speccluster_vars_markdown",
]

PREFIX = "speccluster_"


class VarSpec(NamedTuple):
    """One row of :data:`SPECCLUSTER_VARS`."""

    validator: Callable[[Any], Any]
    """Turns a raw inventory value into the stored value or raises :class:`BadValue`."""
    default: Any
    """Value used when the variable is not set anywhere."""
    doc: str
    """One line of documentation."""
    request: bool = False
    """Sent with the start request of each of the host's dask processes, in its ``host_vars`` by field name."""
    compare: bool = True
    """Part of the host spec's equality and hash (a mapping never is: it cannot be hashed)."""


def field_name(name: str) -> str:
    """The :class:`~speccluster_ssh.inventory.HostSpec` field of variable ``name``: the name without ``speccluster_``."""
    return name[len(PREFIX):]


SPECCLUSTER_VARS: dict[str, VarSpec] = {
    "speccluster_nworkers": VarSpec(
        positive_int, 1, "Workers started by one spec entry on the host (more than 1 makes the entry a group)."
    ),
    "speccluster_nthreads": VarSpec(
        optional_positive_int, None, "Threads per worker; null lets the host decide (its cpu count / nworkers)."
    ),
    "speccluster_memory_limit": VarSpec(
        memory_limit, "auto", "Memory limit per worker: 'auto' or a size such as '4 GiB', '500MB' or bytes."
    ),
    "speccluster_worker_class": VarSpec(
        worker_class, "nanny",
        "Run workers under a Nanny ('nanny'), bare ('worker'), or as the class at an import path such as "
        "dask_cuda.CUDAWorker or mypkg.MyWorker (imported on the host when its agent starts).",
    ),
    "speccluster_slots": VarSpec(
        non_negative_int, 1, "How many spec entries the host accepts; 0 means no workers on this host."
    ),
    "speccluster_resources": VarSpec(
        resources, {}, "Abstract worker resources, a mapping such as {GPU: 1}."
    ),
    "speccluster_python": VarSpec(
        non_empty_str, None,
        "Python interpreter on the host; default <venv>/bin/python, else ansible_python_interpreter, else python3.",
    ),
    "speccluster_env": VarSpec(
        env, {}, "Extra environment variables for the dask processes (numbers become strings)."
    ),
    "speccluster_prologue": VarSpec(
        prologue, None, "Shell lines run before starting dask (a string or a list of strings)."
    ),
    "speccluster_local_directory": VarSpec(
        optional_str, None,
        "Where the dask processes keep scratch and spill files: <dir>/<user>/<cluster>/<host>; default "
        "<dask temporary-directory, else /tmp>/speccluster-ssh-<user>/<cluster>/<host>. Removed when the cluster ends.",
    ),
    "speccluster_interface": VarSpec(
        optional_str, None, "Network interface the dask processes listen on and advertise (e.g. eth0)."
    ),
    "speccluster_scheduler_port": VarSpec(
        _port(optional=False), 0, "Port of the scheduler; 0 picks a free one."
    ),
    "speccluster_dashboard_port": VarSpec(
        _port(optional=True), None, "Port of the scheduler dashboard; null keeps dask's default."
    ),
    "speccluster_known_hosts": VarSpec(
        _choice("strict", "accept-new"), "strict",
        "SSH host key policy: 'strict' (must be in known_hosts) or 'accept-new' (trust on first use).",
    ),
    "speccluster_connect_timeout": VarSpec(
        positive_number, 10.0, "Seconds to wait for the SSH connection."
    ),
    "speccluster_venv": VarSpec(
        optional_str, None, "Path of a virtualenv on the host; its bin/python is used unless speccluster_python is set."
    ),
    "speccluster_worker_options": VarSpec(
        options_mapping, {}, "Extra keyword options passed to the dask worker (or nanny)."
    ),
    "speccluster_scheduler_reach": VarSpec(
        _choice("auto", "direct", "forward"), "auto",
        "How the head reaches the scheduler: 'direct', 'forward' (scheduler on a lab host, reached through "
        "SSH forwards) or 'auto' (probe, then pick); one value for the whole cluster, set it under all.vars.",
    ),
    "speccluster_dask_config": VarSpec(
        dask_config, {},
        "Dask config for the host's processes, deep-merged over the head's config that every host gets "
        "(nested, or dotted keys such as distributed.worker.memory.target).",
        request=True,
    ),
    "speccluster_gpus": VarSpec(
        gpus, 0,
        "GPUs shared evenly among the host's workers (CUDA_VISIBLE_DEVICES and a GPU resource each): "
        "'auto' (nvidia-smi -L on the host), a count, or a list of device ids.",
    ),
    "speccluster_log_max_bytes": VarSpec(
        log_max_bytes, 64 * 2**20,
        "Cap of each process's log file on the host (64 MiB by default), newest part kept: a size such as "
        "'64MiB' (at least 64 KiB).",
    ),
    "speccluster_log_retention": VarSpec(
        log_retention, 7 * 86400.0,
        "Seconds (7 days by default) the host keeps an ended cluster's logs, for 'logs --name' after 'down' "
        "or a crash: a number, or e.g. '7d', '12h', '30m'; 0 removes them when the next cluster starts there.",
        compare=False,  # a change needs no restart of the host's workers
    ),
    "speccluster_cpu_affinity": VarSpec(
        cpu_list, None,
        "CPUs the host's dask processes run on (each worker, nanny and scheduler started there is pinned with "
        "sched_setaffinity): a CPU list such as '0-3,8'; null runs them on every CPU the host gives. An unset "
        "speccluster_nthreads shares the listed CPUs among the host's workers.",
        request=True,
    ),
    "speccluster_lease_dir": VarSpec(
        optional_str, None,
        "Directory on the host where every user's clusters record what they hold there (leases, shared by all "
        "users: sticky and world-writable, like /var/tmp); null uses /var/tmp.",
        compare=False,  # read when the host's agent starts
    ),
    "speccluster_user_quota": VarSpec(
        user_quota, None,
        "Slots one user may hold on the whole lab, checked when a cluster claims: a count for every user, or a "
        "map of user name to count with '*' for everyone else; null: no quota. Set it under all.vars.",
        compare=False,
    ),
    "speccluster_yield_after": VarSpec(
        log_retention, 300.0,
        "Seconds an adaptive cluster's idle workers above its minimum are kept while another user waits for "
        "the host's slots, before they are retired and the slots given back: a number, or e.g. '5m'.",
        compare=False,
    ),
    "speccluster_power_on": VarSpec(
        power_command, None,
        "Command run on the head, without a shell, that switches the host on when it does not answer and the "
        "cluster needs it, e.g. [wakeonlan, '{speccluster_mac}']; {name} is filled from the host's variables.",
        compare=False,
    ),
    "speccluster_power_off": VarSpec(
        power_command, None,
        "Command that puts the host to sleep after speccluster_idle_poweroff: run on the head, or on the host "
        "over the cluster's connection when it starts with ssh (e.g. [ssh, sudo, systemctl, suspend]).",
        compare=False,
    ),
    "speccluster_boot_timeout": VarSpec(
        positive_number, 300.0, "Seconds a host gets to answer SSH after its power-on command.", compare=False
    ),
    "speccluster_idle_poweroff": VarSpec(
        optional_duration, None,
        "Power the host off (speccluster_power_off) after this long with no workers of any cluster on it, "
        "e.g. 30min; null never does.",
        compare=False,
    ),
    "speccluster_power_manage": VarSpec(
        _choice("woken", "always"), "woken",
        "Which hosts speccluster_idle_poweroff powers off: 'woken' (only those this cluster woke) or 'always'.",
        compare=False,
    ),
    "speccluster_mac": VarSpec(
        optional_str, None, "The host's MAC address, for a power-on command such as [wakeonlan, '{speccluster_mac}'].",
        compare=False,
    ),
    "speccluster_environment": VarSpec(
        _choice("host", "head"), "host",
        "Which environment the host's dask processes run in: 'host' (its own python, speccluster_python or "
        "speccluster_venv) or 'head' (one the head ships: its own distributed and dask, and speccluster_packages, "
        "built in a venv on the host from wheels sent over SSH).",
    ),
    "speccluster_packages": VarSpec(
        requirements_list, (),
        "With speccluster_environment: head, more packages for the host's environment: a list of requirement "
        "strings such as ['pandas>=2', 'pyarrow'] (the head's installed version when it fits).",
    ),
    "speccluster_requirements": VarSpec(
        head_path, None,
        "With speccluster_environment: head, a requirements file on the head (relative to the current directory) "
        "whose lines are added to speccluster_packages.",
    ),
    "speccluster_env_dir": VarSpec(
        optional_str, None,
        "With speccluster_environment: head, where the host keeps its shipped environments and wheels; null uses "
        "~/.cache/speccluster-ssh/envs.",
        compare=False,  # read when the host's agent starts
    ),
}


# Read by the playbooks in playbooks/ only; accepted in inventories and ignored
# by speccluster-ssh, so one inventory serves both.
PLAYBOOK_VARS: dict[str, str] = {
    f"speccluster_{name}": "provisioning option, see playbooks/README.md"
    for name in (
        "distributed_version", "head_python", "wheelhouse", "pip_index_url", "pip_extra_args", "bokeh",
        "bokeh_version", "base_python", "system_packages", "cache_dir", "teardown_cluster", "keep_venv",
        "kill_grace", "check_ports", "check_bind", "head_address", "min_free_mb", "max_clock_skew",
        "check_seconds",
    )
}


def speccluster_vars_markdown() -> str:
    """Render :data:`SPECCLUSTER_VARS` as a Markdown table for the README.

    Returns
    -------
    str
        A table with one row per variable: name, default and description.
    """
    rows = ["| Variable | Default | Description |", "|---|---|---|"]
    for name, spec in SPECCLUSTER_VARS.items():
        default = "null" if spec.default is None else repr(spec.default)
        rows.append(f"| `{name}` | `{default}` | {spec.doc} |")
    return "\n".join(rows)

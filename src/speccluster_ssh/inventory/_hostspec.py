"""Turn the merged variables of one host into a validated :class:`HostSpec`."""

from __future__ import annotations

import copy
import difflib
import inspect
import os
import shlex
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from ._errors import InventoryError, Origin
from ._jumps import JumpHop, jumps_from_args
from ._loader import UnsafeStr, VaultStr
from ._vars import PLAYBOOK_VARS, PREFIX, SPECCLUSTER_VARS, BadValue, field_name

__all__ = ["HostSpec", "check_var_names", "resolve_host"]

# ansible_connection values we can honour; paramiko and smart end up as ssh
_CONNECTIONS = {
    "ssh": "ssh",
    "paramiko": "ssh",
    "paramiko_ssh": "ssh",
    "smart": "ssh",
    "local": "local",
}
_AUTO_INTERPRETERS = {"auto", "auto_silent", "auto_legacy", "auto_legacy_silent"}


def _with_table_fields(cls: type) -> type:
    """Give ``cls`` one field per row of :data:`SPECCLUSTER_VARS`, before ``@dataclass`` reads its fields.

    The fields go after the declared fields without a default and before the
    others (``vars``, ``jumps``): each defaults to its row's default (a fresh
    copy of a mapping), and a row that is not ``compare``, or whose value is a
    mapping, stays out of equality and hash.
    """
    declared: dict[str, Any] = dict(inspect.get_annotations(cls))
    required = {n: a for n, a in declared.items() if n not in cls.__dict__}  # declared without a default
    table: dict[str, Any] = {}
    for var, row in SPECCLUSTER_VARS.items():
        name = field_name(var)
        table[name] = getattr(row.validator, "__annotations__", {}).get("return", "Any")
        if isinstance(row.default, Hashable):
            setattr(cls, name, field(default=row.default, compare=row.compare))
        else:
            setattr(cls, name, field(default_factory=partial(copy.deepcopy, row.default), compare=False))
    rest = {n: a for n, a in declared.items() if n not in required}
    cls.__annotations__ = {**required, **table, **rest}
    return cls


@dataclass(frozen=True)
@_with_table_fields
class HostSpec:
    """Everything speccluster-ssh needs to know about one inventory host.

    Attributes
    ----------
    name
        Inventory hostname.
    address
        Address to connect to: ``ansible_host`` (or ``ansible_ssh_host``), else the name.
    port
        SSH port from ``ansible_port``/``ansible_ssh_port`` or a ``host:port`` pattern.
    user
        Remote user (``ansible_user``/``ansible_ssh_user``), ``None`` for the SSH default.
    key_file
        Private key file (``ansible_ssh_private_key_file``), with ``~`` expanded.
    connection
        ``"ssh"`` or ``"local"``.
    ssh_common_args
        ``ansible_ssh_common_args`` split like a shell command line.
    groups
        Every group the host belongs to, ancestors included, sorted, without ``all``.
    nworkers, nthreads, memory_limit, worker_class, slots, resources, env, ...
        One field per row of :data:`SPECCLUSTER_VARS`, named as the variable
        without ``speccluster_``: its validated value, or the row's default.
        Two are finished from other variables:
    python
        Python interpreter to run on the host: ``speccluster_python``, else
        ``<speccluster_venv>/bin/python``, else ``ansible_python_interpreter``,
        else ``python3``.
    gpus
        ``speccluster_gpus``: ``"auto"`` or the device ids (a count ``n``
        gives ``"0"`` .. ``"n-1"``; none is ``()``).
    vars
        Every merged variable, as ``ansible-inventory --list`` shows it for the host.
    jumps
        Jump hosts from ``-J``/``-o ProxyJump=`` in ``ansible_ssh_common_args``
        or ``ansible_ssh_extra_args``, first hop first; hops that are
        inventory hosts are filled in from them. ``None`` when the arguments
        name no jump (ssh_config may still name one), ``()`` for
        ``ProxyJump=none``.
    """

    name: str
    address: str
    port: int | None
    user: str | None
    key_file: str | None
    connection: str
    ssh_common_args: tuple[str, ...]
    groups: tuple[str, ...]
    # The speccluster_* fields come here, from the table (_with_table_fields).
    vars: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)
    jumps: tuple[JumpHop, ...] | None = None

    if TYPE_CHECKING:  # the table's fields, to a type checker
        def __getattr__(self, name: str) -> Any: ...

    @property
    def is_local(self) -> bool:
        """Whether commands for this host run locally instead of over SSH."""
        return self.connection == "local"

    def request_vars(self) -> dict[str, Any]:
        """The values every start request on this host carries: its rows marked ``request``, by field name.

        Only those set to something other than their default, so that a host
        that sets none sends none.
        """
        return {
            field_name(var): getattr(self, field_name(var))
            for var, row in SPECCLUSTER_VARS.items()
            if row.request and getattr(self, field_name(var)) != row.default
        }

    @property
    def worker_class_path(self) -> str | None:
        """The import path ``speccluster_worker_class`` names (e.g. ``dask_cuda.CUDAWorker``); ``None`` for nanny or worker."""
        return None if self.worker_class in ("nanny", "worker") else self.worker_class


def _contains(value: Any, kind: type) -> bool:
    if isinstance(value, kind):
        return True
    if isinstance(value, Mapping):
        return any(_contains(v, kind) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_contains(v, kind) for v in value)
    return False


def _has_template(value: Any) -> bool:
    if isinstance(value, UnsafeStr):
        return False  # !unsafe means "take literally"
    if isinstance(value, str):
        return "{{" in value or "{%" in value
    if isinstance(value, Mapping):
        return any(_has_template(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_template(v) for v in value)
    return False


def _plain(value: Any) -> Any:
    """Drop our str subclasses so that HostSpec fields hold plain types."""
    if isinstance(value, str):
        return str(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _plain_containers(value: Any) -> Any:
    """Deep copy with plain dicts and lists, keeping scalar values as they are."""
    if isinstance(value, Mapping):
        return {k: _plain_containers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_containers(v) for v in value]
    return value


def _usable(host: str, var: str, value: Any, origin: Origin | None) -> Any:
    """Refuse values we cannot use literally: vaulted or templated ones."""
    if _contains(value, VaultStr):
        raise InventoryError(
            f"{var} on host {host} is vault-encrypted; speccluster-ssh cannot decrypt "
            "vault values, so write it in clear text",
            origin,
        )
    if _has_template(value):
        raise InventoryError(
            f"{var} on host {host} is a Jinja2 template ({value!r}), which speccluster-ssh "
            "does not evaluate; write the final value",
            origin,
        )
    return _plain(value)


def suggest(name: str) -> str:
    """A ``did you mean`` hint for an unknown ``speccluster_`` variable."""
    close = difflib.get_close_matches(name, [*SPECCLUSTER_VARS, *PLAYBOOK_VARS], n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]}?"
    return "known names: " + ", ".join(SPECCLUSTER_VARS)


def check_var_names(variables: Mapping[Any, Any], origins: Mapping[Any, Origin], owner: str) -> None:
    """Reject unknown ``speccluster_*`` names, suggesting the closest known one.

    Parameters
    ----------
    variables
        Variables of a host or group.
    origins
        Where each variable was set, when known.
    owner
        ``"host NAME"`` or ``"group NAME"``, for the message.

    Raises
    ------
    InventoryError
        On the first unknown name.
    """
    for name in variables:
        if isinstance(name, str) and name.startswith(PREFIX) and name not in SPECCLUSTER_VARS and name not in PLAYBOOK_VARS:
            origin = origins.get(name)
            raise InventoryError(
                f"unknown variable {name} on {owner}; {suggest(name)}",
                origin,
            )


def _last(variables: Mapping[str, Any], *names: str) -> tuple[str, Any] | None:
    # ansible's ssh plugin reads its aliases in order and the last one set wins
    found = None
    for name in names:
        if name in variables:
            found = (name, variables[name])
    return found


def _connection_str(host: str, var: str, value: Any, origin: Origin | None) -> str:
    value = _usable(host, var, value, origin)
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value).strip() == "":
        raise InventoryError(
            f"{var} on host {host} must be a non-empty string, got {value!r}; fix the value",
            origin,
        )
    return str(value)


def resolve_host(
    name: str,
    variables: dict[str, Any],
    origins: Mapping[str, Origin],
    groups: tuple[str, ...],
    warnings: list[str] | None = None,
) -> HostSpec:
    """Validate the merged variables of a host and build its :class:`HostSpec`.

    Parameters
    ----------
    name
        Inventory hostname.
    variables
        Merged variables, as ansible would give them for the host.
    origins
        Where each variable was set, when known.
    groups
        Sorted names of the host's groups, without ``all``.
    warnings
        Optional list that collects non-fatal problems.

    Returns
    -------
    HostSpec
        The validated host.

    Raises
    ------
    InventoryError
        On an unknown ``speccluster_`` variable, a value of the wrong type or
        unit, or an unsupported ``ansible_connection``.
    """
    check_var_names(variables, origins, f"host {name}")

    def var_origin(var: str) -> Origin | None:
        return origins.get(var)

    # --- speccluster_* ------------------------------------------------------
    spec: dict[str, Any] = {}
    for var, row in SPECCLUSTER_VARS.items():
        if var not in variables:
            spec[var] = copy.deepcopy(row.default)  # a host's own mapping, never the table's
            continue
        raw = _usable(name, var, variables[var], var_origin(var))
        try:
            spec[var] = row.validator(raw)
        except BadValue as exc:
            origin = var_origin(var)
            raise InventoryError(
                f"{var} on host {name} must be {exc.expected}, got {raw!r}; {exc.fix}",
                origin,
            ) from None

    _check_power_placeholders(name, spec, variables, var_origin)

    # --- ansible connection variables ----------------------------------------
    found = _last(variables, "ansible_host", "ansible_ssh_host")
    address = _connection_str(name, found[0], found[1], var_origin(found[0])) if found else name

    port: int | None = None
    found = _last(variables, "ansible_port", "ansible_ssh_port")
    if found is not None and found[1] is not None:
        var, value = found
        value = _usable(name, var, value, var_origin(var))
        number = value if isinstance(value, int) and not isinstance(value, bool) else None
        if isinstance(value, str) and value.strip().isdigit():
            number = int(value)
        if number is None or not 1 <= number <= 65535:
            raise InventoryError(
                f"{var} on host {name} must be a port number from 1 to 65535, got {value!r}"
                f"; write e.g. 22",
                var_origin(var),
            )
        port = number

    user: str | None = None
    found = _last(variables, "ansible_user", "ansible_ssh_user")
    if found is not None and found[1] is not None:
        user = _connection_str(name, found[0], found[1], var_origin(found[0]))

    key_file: str | None = None
    found = _last(variables, "ansible_private_key_file", "ansible_ssh_private_key_file")
    if found is not None and found[1] is not None:
        key_file = os.path.expanduser(_connection_str(name, found[0], found[1], var_origin(found[0])))

    connection = "ssh"
    if variables.get("ansible_connection") is not None:
        raw = _connection_str(
            name, "ansible_connection", variables["ansible_connection"], var_origin("ansible_connection")
        )
        short = raw.strip()
        for prefix in ("ansible.builtin.", "ansible.legacy."):
            if short.startswith(prefix):
                short = short[len(prefix) :]
        if short not in _CONNECTIONS:
            origin = var_origin("ansible_connection")
            raise InventoryError(
                f"ansible_connection on host {name} is {raw!r}, which speccluster-ssh does not "
                "support; use ssh (paramiko and smart also mean ssh) or local",
                origin,
            )
        connection = _CONNECTIONS[short]

    ssh_common_args = _ssh_args(name, "ansible_ssh_common_args", variables, var_origin)
    # ansible puts extra args after the common ones; ssh keeps the first jump it reads.
    ssh_extra_args = _ssh_args(name, "ansible_ssh_extra_args", variables, var_origin)
    jumps: tuple[JumpHop, ...] | None = None
    for var, args in (("ansible_ssh_common_args", ssh_common_args), ("ansible_ssh_extra_args", ssh_extra_args)):
        try:
            jumps = jumps_from_args(args)
        except ValueError as exc:
            raise InventoryError(f"{var} on host {name}: {exc}", var_origin(var)) from None
        if jumps is not None:
            break

    # --- python: ours, then the venv's, then ansible's, then python3 ---------
    python = spec["speccluster_python"]
    if python is None and spec["speccluster_venv"] is not None:
        python = spec["speccluster_venv"].rstrip("/") + "/bin/python"
    interp_raw = variables.get("ansible_python_interpreter")
    if python is None and interp_raw is not None and _has_template(interp_raw):
        # common for localhost ("{{ ansible_playbook_python }}"); we cannot
        # evaluate it, so fall back to python3 instead of failing
        if warnings is not None:
            warnings.append(
                f"ansible_python_interpreter on host {name} is a template ({interp_raw!r}); using python3, "
                "set speccluster_python to choose another interpreter"
            )
    elif python is None and interp_raw is not None:
        interp = _connection_str(
            name, "ansible_python_interpreter", variables["ansible_python_interpreter"],
            var_origin("ansible_python_interpreter"),
        )
        if interp.strip() not in _AUTO_INTERPRETERS:
            python = interp
    if python is None:
        python = "python3"

    devices = spec["speccluster_gpus"]
    if isinstance(devices, int):  # a count: devices 0 .. n-1
        devices = tuple(str(i) for i in range(devices))
    workers = spec["speccluster_slots"] * spec["speccluster_nworkers"]
    if devices != "auto" and workers and len(devices) % workers:
        raise InventoryError(
            f"speccluster_gpus on host {name} gives {len(devices)} GPUs, which do not divide evenly among its "
            f"{workers} workers (speccluster_slots {spec['speccluster_slots']} x speccluster_nworkers "
            f"{spec['speccluster_nworkers']}); give a multiple of {workers} GPUs or change the worker count",
            var_origin("speccluster_gpus"),
        )

    # The two fields finished from other variables; every other field is its variable's value.
    spec["speccluster_python"], spec["speccluster_gpus"] = python, devices
    return HostSpec(
        name=name,
        address=address,
        port=port,
        user=user,
        key_file=key_file,
        connection=connection,
        ssh_common_args=ssh_common_args,
        groups=groups,
        **{field_name(var): value for var, value in spec.items()},
        vars=_plain_containers(variables),
        jumps=jumps,
    )


def _ssh_args(name: str, var: str, variables: Mapping[str, Any], var_origin: Any) -> tuple[str, ...]:
    """``var`` (a string of ssh options, or a list of them) split into tokens with shlex."""
    if variables.get(var) is None:
        return ()
    value = _usable(name, var, variables[var], var_origin(var))
    if isinstance(value, str):
        try:
            return tuple(shlex.split(value))
        except ValueError as exc:
            raise InventoryError(
                f"{var} on host {name} cannot be split ({exc}); check its quotes",
                var_origin(var),
            ) from None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise InventoryError(
        f"{var} on host {name} must be a string of ssh options, got {value!r}"
        f"; write e.g. '-o ProxyJump=bastion'",
        var_origin(var),
    )


def _check_power_placeholders(
    name: str, spec: Mapping[str, Any], variables: Mapping[str, Any], var_origin: Any
) -> None:
    """Every ``{variable}`` of the host's power commands names a plain value the host has."""
    from ..power import PlaceholderError, fill_command  # pure, imports nothing of the package

    for var in ("speccluster_power_on", "speccluster_power_off"):
        if spec.get(var) is None:
            continue
        try:
            fill_command(spec[var], variables, name)
        except PlaceholderError as exc:
            raise InventoryError(
                f"{var} on host {name} uses {{{exc.variable}}}, but {exc.variable} "
                + ("is not set for that host" if "not set" in exc.why else "is not a string or a number there")
                + f"; set {exc.variable} for {name} (on its line or in host_vars/{name}.yml)",
                var_origin(var),
            ) from None

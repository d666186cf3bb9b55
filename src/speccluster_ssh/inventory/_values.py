"""The value checkers of the ``speccluster_*`` inventory variables.

Each turns a raw inventory value into the stored one, or raises
:class:`~speccluster_ssh.inventory._badvalue.BadValue` saying what was expected
and how to fix it. :data:`~speccluster_ssh.inventory._vars.SPECCLUSTER_VARS`
names one for each variable; kept apart from that table so each stays small.
"""

from __future__ import annotations

import keyword
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from ..units import parse_bytes, parse_duration
from ._badvalue import BadValue


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_int(value: Any) -> int | None:
    """An int from an int or a string of digits, else None."""
    if _is_int(value):
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]+\s*", value):
        return int(value)
    return None


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def positive_int(value: Any) -> int:
    """Validate an integer >= 1."""
    number = _as_int(value)
    if number is None or number < 1:
        raise BadValue("a positive integer", "write a whole number such as 2")
    return number


def non_negative_int(value: Any) -> int:
    """Validate an integer >= 0."""
    number = _as_int(value)
    if number is None or number < 0:
        raise BadValue("an integer >= 0", "write a whole number such as 1 (0 means no workers here)")
    return number


def optional_positive_int(value: Any) -> int | None:
    """Validate an integer >= 1 or null."""
    if value is None:
        return None
    number = _as_int(value)
    if number is None or number < 1:
        raise BadValue("a positive integer or null", "write a whole number such as 4, or null to use the cpu count")
    return number


def memory_limit(value: Any) -> int | str:
    """Validate ``"auto"`` or a positive size, returned in bytes."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        size = parse_bytes(value)
    except ValueError:
        size = 0
    if size <= 0:
        raise BadValue("'auto' or a positive size", "write a size such as '4 GiB' or '500MB', or auto")
    return size


def _choice(*choices: str) -> Callable[[Any], str]:
    listed = " or ".join(repr(c) for c in choices)

    def check(value: Any) -> str:
        if isinstance(value, str) and value.strip().lower() in choices:
            return value.strip().lower()
        raise BadValue(f"one of {listed}", f"write {listed}")

    check.__doc__ = f"Validate one of {listed}."
    return check


def worker_class(value: Any) -> str:
    """Validate ``"nanny"``, ``"worker"`` or the import path of a class, such as ``dask_cuda.CUDAWorker``.

    Only the spelling is checked here (dotted Python identifiers, at least a
    module and a name); the class is imported on each host when its agent
    starts.
    """
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("nanny", "worker"):
            return text.lower()
        parts = text.split(".")
        if len(parts) >= 2 and all(part.isidentifier() and not keyword.iskeyword(part) for part in parts):
            return text
    raise BadValue(
        "'nanny', 'worker' or the import path of a class (module.Class)",
        "write nanny, worker, or a path such as dask_cuda.CUDAWorker or mypkg.MyWorker",
    )


def resources(value: Any) -> dict[str, float]:
    """Validate a mapping of resource names to non-negative numbers."""
    expected = "a mapping of resource names to numbers"
    fix = "write e.g. {GPU: 1, MEMORY: 8e9}"
    if not isinstance(value, Mapping):
        raise BadValue(expected, fix)
    result: dict[str, float] = {}
    for key, amount in value.items():
        number = _as_number(amount)
        if not isinstance(key, str) or not key or number is None or number < 0:
            raise BadValue(expected, fix)
        result[str(key)] = number
    return result


def non_empty_str(value: Any) -> str:
    """Validate a non-empty string."""
    if not isinstance(value, str) or not value.strip():
        raise BadValue("a non-empty string", "write a path such as /usr/bin/python3")
    return str(value)


def optional_str(value: Any) -> str | None:
    """Validate a non-empty string or null."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise BadValue("a non-empty string or null", "write a plain string, or null")
    return str(value)


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def env(value: Any) -> dict[str, str]:
    """Validate a mapping of environment variable names to strings (numbers become strings)."""
    expected = "a mapping of environment variable names to strings"
    fix = "write e.g. {OMP_NUM_THREADS: 1, MALLOC_TRIM_THRESHOLD_: '0'}"
    if not isinstance(value, Mapping):
        raise BadValue(expected, fix)
    result: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not _ENV_NAME.match(key):
            raise BadValue(expected + f" (bad name {key!r})", fix)
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise BadValue(expected + f" (bad value for {key})", fix)
        result[key] = str(item)
    return result


def prologue(value: Any) -> str | None:
    """Validate shell lines: a string or a list of strings, joined by newlines."""
    if value is None:
        return None
    if isinstance(value, str):
        return str(value) if value.strip() else None
    if isinstance(value, list) and all(isinstance(line, str) for line in value):
        return "\n".join(str(line) for line in value) if value else None
    raise BadValue("a string or a list of strings (shell lines)", "write e.g. ['module load python', 'ulimit -n 4096']")


def _port(optional: bool) -> Callable[[Any], int | None]:
    def check(value: Any) -> int | None:
        if value is None and optional:
            return None
        number = _as_int(value)
        if number is None or not 0 <= number <= 65535:
            expected = "a port number from 0 to 65535" + (" or null" if optional else "")
            raise BadValue(expected, "write e.g. 8786 (0 picks a free port)")
        return number

    check.__doc__ = "Validate a port number 0-65535" + (" or null." if optional else ".")
    return check


def positive_number(value: Any) -> float:
    """Validate a number > 0."""
    number = _as_number(value)
    if number is None or number <= 0:
        raise BadValue("a positive number of seconds", "write e.g. 10 or 2.5")
    return number


def options_mapping(value: Any) -> dict[str, Any]:
    """Validate a mapping with string keys."""
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and k for k in value):
        raise BadValue("a mapping of option names to values", "write e.g. {lifetime: 1h, lifetime_stagger: 5m}")
    return dict(value)


def dask_config(value: Any) -> dict[str, Any]:
    """Validate a mapping of dask config, nested or with dotted keys (``distributed.worker.memory.target``).

    Dotted keys are expanded as ``dask.config.set`` does; values must be
    plain data (strings, numbers, booleans, null, lists, mappings).
    """
    expected = "a mapping of dask config (nested, or dotted keys such as distributed.worker.memory.target)"
    fix = "write e.g. {distributed.worker.memory.target: 0.5}"
    if not isinstance(value, Mapping):
        raise BadValue(expected, fix)

    def plain(item: Any, where: str) -> Any:
        if item is None or isinstance(item, (str, bool, int, float)):
            return item
        if isinstance(item, list):
            return [plain(v, where) for v in item]
        if isinstance(item, Mapping):
            return nest(item, where)
        raise BadValue(expected + f" (the value of {where} is not plain data)", fix)

    def nest(mapping: Mapping[Any, Any], where: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, item in mapping.items():
            if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
                raise BadValue(expected + f" (bad key {key!r})", fix)
            *parents, last = key.split(".")
            node = out
            for part in parents:
                child = node.get(part)
                if not isinstance(child, dict):
                    child = node[part] = {}
                node = child
            converted = plain(item, f"{where}.{key}" if where else key)
            if isinstance(converted, dict) and isinstance(node.get(last), dict):
                node[last] = _merged(node[last], converted)
            else:
                node[last] = converted
        return out

    return nest(value, "")


def _merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, item in override.items():
        out[key] = _merged(out[key], item) if isinstance(item, dict) and isinstance(out.get(key), dict) else item
    return out


def gpus(value: Any) -> str | int | tuple[str, ...]:
    """Validate ``"auto"``, a count of GPUs (kept as an int) or a list of device ids (a tuple of strings)."""
    expected = "'auto', a number of GPUs or a list of device ids"
    fix = "write auto, a count such as 4, or a list such as [0, 1] or [GPU-5fd2..., GPU-77aa...]"
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    count = _as_int(value)
    if count is not None:
        if count < 0:
            raise BadValue(expected, fix)
        return count
    if isinstance(value, list):
        ids: list[str] = []
        for item in value:
            if isinstance(item, bool) or not isinstance(item, (int, str)):
                raise BadValue(expected, fix)
            text = str(item).strip()
            if not text or "," in text or any(c.isspace() for c in text) or text in ids:
                raise BadValue(expected + f" (bad or repeated device id {item!r})", fix)
            ids.append(text)
        return tuple(ids)
    raise BadValue(expected, fix)


MIN_LOG_BYTES = 64 * 1024


def log_max_bytes(value: Any) -> int:
    """Validate a size of at least 64 KiB, returned in bytes."""
    try:
        size = parse_bytes(value)
    except ValueError:
        size = 0
    if size < MIN_LOG_BYTES:
        raise BadValue("a size of at least 64 KiB", "write a size such as '64MiB' or '500 MB'")
    return size


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def log_retention(value: Any) -> float:
    """Validate a duration of 0 or more: seconds, or a number with s, m, h, d or w; returned in seconds."""
    number = _as_number(value)
    if number is None and isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", value.lower())
        number = float(match.group(1)) * _DURATION_UNITS[match.group(2)] if match else None
    if number is None or number < 0 or not math.isfinite(number):
        raise BadValue("a duration of 0 or more", "write e.g. 7d, 12h, 30m or a number of seconds")
    return number


def user_quota(value: Any) -> dict[str, int] | None:
    """Validate ``speccluster_user_quota``: null, a count of slots, or a map of user name to count."""
    from ..leases import parse_user_quota  # pure, imports nothing of the package

    try:
        return parse_user_quota(value)
    except ValueError as exc:
        raise BadValue(str(exc), "write e.g. 8, or {alice: 16, '*': 4}") from None


def requirements_list(value: Any) -> tuple[str, ...]:
    """Validate a list of pip requirement strings (one string is a list of one), kept as written."""
    from packaging.requirements import InvalidRequirement, Requirement  # a dependency of distributed

    expected = "a list of requirement strings"
    fix = "write e.g. ['pandas>=2', 'pyarrow']"
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
        raise BadValue(expected, fix)
    for item in items:
        try:
            Requirement(item)
        except InvalidRequirement as exc:
            raise BadValue(expected + f" ({item!r} is not one: {str(exc).splitlines()[0]})", fix) from None
    return tuple(item.strip() for item in items)


def head_path(value: Any) -> str | None:
    """Validate a path on the head, or null: ``~`` expanded, made absolute (from the current directory)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise BadValue("a path on this machine, or null", "write e.g. ~/lab/requirements.txt")
    return os.path.abspath(os.path.expanduser(value.strip()))


_MAX_CPU = 65535  # a bound, so that a typo cannot make a list of millions
_CPU_RANGE = re.compile(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?")


def cpu_list(value: Any) -> tuple[int, ...] | None:
    """Validate a CPU list as ``taskset -c`` takes it (``"0-3,8"``), one CPU number, a list of them, or null.

    Returned as the sorted CPU numbers; the host's agent checks at start that it has them.
    """
    if value is None:
        return None
    expected = "a CPU list such as '0-3,8'"
    fix = "write CPU numbers and ranges separated by commas, e.g. 0-3,8, or null for no pinning"
    if isinstance(value, bool) or not isinstance(value, (str, int, list)) or value == []:
        raise BadValue(expected, fix)
    cpus: set[int] = set()
    for part in value if isinstance(value, list) else str(value).split(","):
        match = None if isinstance(part, bool) else _CPU_RANGE.fullmatch(str(part))
        first = int(match.group(1)) if match else -1
        last = int(match.group(2) or first) if match else -1
        if match is None or first > last or last > _MAX_CPU:
            raise BadValue(expected + f" (bad part {str(part).strip()!r})", fix)
        cpus.update(range(first, last + 1))
    return tuple(sorted(cpus))


def power_command(value: Any) -> tuple[str, ...] | None:
    """Validate a power command: null, or a list of arguments (strings or numbers), run without a shell."""
    if value is None:
        return None
    expected = "a list of arguments (the command runs without a shell)"
    fix = "write e.g. [wakeonlan, '{speccluster_mac}'] or [ipmitool, -H, '{bmc_host}', chassis, power, 'on']"
    if not isinstance(value, list) or not value:
        raise BadValue(expected, fix)
    argv: list[str] = []
    for item in value:
        if isinstance(item, bool):
            # YAML reads a bare on, off, yes or no as a boolean.
            raise BadValue(expected + f" (an argument is the boolean {item!r})", "quote on, off, yes and no: 'on'")
        if not isinstance(item, (str, int, float)) or str(item) == "":
            raise BadValue(expected + f" (bad argument {item!r})", fix)
        argv.append(str(item))
    if argv[0] == "ssh" and len(argv) < 2:
        raise BadValue(expected + " ([ssh] alone runs nothing)", "write e.g. [ssh, sudo, systemctl, suspend]")
    return tuple(argv)


def optional_duration(value: Any) -> float | None:
    """Validate null or a duration (``30min``, ``2h``, a number of seconds) greater than 0; returned in seconds."""
    if value is None:
        return None
    try:
        seconds = parse_duration(value)
    except ValueError:
        seconds = 0.0
    if seconds <= 0:
        raise BadValue("a duration greater than 0, or null", "write e.g. 30min, 2h or 600")
    return seconds


#: Every variable speccluster-ssh reads from an inventory: name -> (validator, default, doc, request, compare).

"""Host patterns of Ansible inventories: ``host:port`` and ``[a:b:step]`` ranges.

The rules follow ansible-core's ``parse_address`` and
``expand_hostname_range``: a port is split off only when what remains is a
valid host name or address, ranges are expanded left to right, a begin bound
with a leading zero pads every name to its width, and one-letter bounds make
an alphabetic range over ``a..zA..Z``.  Where ansible silently produces no
host (``node[05:01]``) or accepts odd bounds (``[-1:3]``), we raise instead:
such ranges are always typos.
"""

from __future__ import annotations

import re
import string

__all__ = ["expand_host_pattern", "expand_ranges", "split_port"]

# One bracketed range as ansible's address grammar accepts it inside labels.
_ALNUM_RANGE = r"\[(?:[a-z]:[a-z]|[0-9]+:[0-9]+)(?::[0-9]+)?\]"
_LABEL = rf"(?:\w|{_ALNUM_RANGE})(?:[\w-]|{_ALNUM_RANGE})*(?<![_-])"
_HOSTNAME_RE = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$", re.IGNORECASE)
_HEX_RANGE_RE = re.compile(r"\[[0-9a-f]+:[0-9a-f]+(?::[0-9]+)?\]", re.IGNORECASE)

# "[anything]:port" (IPv6 and friends) and "host-or-pattern:port".
_BRACKETED_PORT_RE = re.compile(r"^\[(.+)\]:([0-9]+)$")
_HOST_PORT_RE = re.compile(r"^((?:[^:\[\]]|\[[^\]]*\])*):([0-9]+)$")


_HEX_GROUP_RE = re.compile(r"^[0-9a-f]{1,4}$")
# prefixes ansible accepts in front of a dotted IPv4 tail inside an IPv6 address
_IPV4_TAIL_PREFIXES = ("0:0:0:0:0:0:", "::", "::ffff:", "0:0:0:0:0:ffff:")


def _is_ipv6(text: str) -> bool:
    """IPv6 address check with ansible's grammar (ranges allowed in groups).

    Differs from :mod:`ipaddress` on purpose: ansible lets ``::`` stand for
    at least one group only when at most six groups are written on one side
    (so ``1:2:3:4:5:6:7::`` is refused) and accepts a dotted IPv4 tail only
    after ``::``, ``::ffff:``, ``0:0:0:0:0:0:`` or ``0:0:0:0:0:ffff:``.
    """
    # any group value is as good as a range for checking the shape
    candidate = _HEX_RANGE_RE.sub("0", text).lower()
    if "." in candidate:
        head, _, dotted = candidate.rpartition(":")
        parts = dotted.split(".")
        if len(parts) != 4 or not all(_HEX_GROUP_RE.match(p) for p in parts):
            return False
        return head + ":" in _IPV4_TAIL_PREFIXES
    if candidate.count("::") > 1:
        return False
    if "::" in candidate:
        left, right = candidate.split("::")
        left_groups = left.split(":") if left else []
        right_groups = right.split(":") if right else []
        if not all(_HEX_GROUP_RE.match(g) for g in left_groups + right_groups):
            return False
        n_left, n_right = len(left_groups), len(right_groups)
        if n_left == 0 or n_right == 0:
            return n_left + n_right <= 6
        return n_left + n_right <= 7
    groups = candidate.split(":")
    return len(groups) == 8 and all(_HEX_GROUP_RE.match(g) for g in groups)


def split_port(pattern: str) -> tuple[str, int | None]:
    """Split an optional ``:port`` suffix off a host pattern.

    Parameters
    ----------
    pattern
        ``"node01"``, ``"node[01:04]:2222"``, ``"[::1]:22"``, ``"10.0.0.1:22"``.

    Returns
    -------
    tuple
        The pattern without port, and the port or ``None``.  When the part
        before the port is not a valid host name, pattern or address, the
        whole text is kept as the name with no port, like ansible does.
    """
    host = pattern
    port: int | None = None
    # both forms are tried in turn, as ansible does: "[h:1]:2" ends as h, 1
    for regex in (_BRACKETED_PORT_RE, _HOST_PORT_RE):
        match = regex.match(host)
        if match:
            host, port = match.group(1), int(match.group(2))
    if port is None:
        return pattern, None
    if _HOSTNAME_RE.match(host) or _is_ipv6(host):
        return host, port
    return pattern, None


def _bad_range(name: str, problem: str, fix: str) -> ValueError:
    return ValueError(f"bad host range in {name!r}: {problem}; {fix}")


def expand_ranges(name: str) -> list[str]:
    """Expand every ``[begin:end]`` or ``[begin:end:step]`` range in a name.

    Parameters
    ----------
    name
        A host name that may hold ranges: ``node[01:10]``, ``rack[a:c]-n[1:2]``,
        ``n[1:9:2]``.

    Returns
    -------
    list of str
        The names in order; zero padding of the begin bound is kept.

    Raises
    ------
    ValueError
        For malformed or empty ranges, with a message that names the range.
    """
    if "[" not in name:
        if "]" in name:
            raise _bad_range(name, "']' without '['", "remove the stray bracket")
        return [name]
    head, _, rest = name.partition("[")
    body, closed, tail = rest.partition("]")
    if not closed or "]" in head or "[" in body:
        raise _bad_range(name, "unbalanced brackets", "write ranges as name[begin:end]")
    bounds = body.split(":")
    if len(bounds) not in (2, 3):
        raise _bad_range(name, f"[{body}] is not begin:end or begin:end:step", "write e.g. node[01:10] or node[1:9:2]")
    begin, end = bounds[0], bounds[1]
    step_text = bounds[2] if len(bounds) == 3 else "1"
    if not begin:
        begin = "0"  # ansible reads "[:5]" as "[0:5]"
    if not end:
        raise _bad_range(name, "the range has no end value", "write e.g. node[01:10]")
    if not step_text.isdigit() or int(step_text) == 0:
        raise _bad_range(name, f"step {step_text!r} is not a positive integer", "write e.g. node[1:9:2]")
    step = int(step_text)

    values: list[str]
    letters = string.ascii_letters
    if len(begin) == 1 and len(end) == 1 and begin in letters and end in letters:
        i_begin, i_end = letters.index(begin), letters.index(end)
        if i_begin > i_end:
            raise _bad_range(name, f"{begin!r} comes after {end!r}", f"write [{end}:{begin}]")
        values = list(letters[i_begin : i_end + 1 : step])
    elif begin.isdigit() and end.isdigit():
        if begin.startswith("0") and len(begin) > 1:
            width = len(begin)
            if len(end) != width:
                raise _bad_range(
                    name,
                    f"zero-padded bounds {begin!r} and {end!r} differ in length",
                    f"pad both to {width} digits",
                )
        else:
            width = 0
        if int(begin) > int(end):
            raise _bad_range(name, f"begin {begin} is greater than end {end}", f"write [{end}:{begin}]")
        values = [str(i).zfill(width) for i in range(int(begin), int(end) + 1, step)]
    else:
        raise _bad_range(
            name,
            f"[{body}] mixes letters and digits or uses non-digit bounds",
            "use two numbers (node[01:10]) or two single letters (rack[a:f])",
        )

    names: list[str] = []
    for value in values:
        names.extend(expand_ranges(f"{head}{value}{tail}"))
    return names


def expand_host_pattern(pattern: str) -> tuple[list[str], int | None]:
    """Turn one inventory host entry into host names and an optional port.

    Parameters
    ----------
    pattern
        A host entry as written in an inventory, e.g. ``"node[01:03]:2222"``.

    Returns
    -------
    tuple
        ``(names, port)``.

    Raises
    ------
    ValueError
        If a range in the pattern is malformed or empty.
    """
    host, port = split_port(pattern)
    if "[" in host or "]" in host:
        return expand_ranges(host), port
    return [host], port

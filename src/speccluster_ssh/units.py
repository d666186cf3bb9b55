"""Parse and format byte sizes such as ``"4 GiB"``, ``"500MB"`` or ``4e9``.

The parser is deliberately stricter than :func:`dask.utils.parse_bytes`: a
unit without a number (``"MB"``), negative sizes, booleans and non-finite
numbers are rejected, because in an inventory they are always mistakes.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

from dask.utils import format_bytes as _dask_format_bytes

__all__ = ["BYTE_UNITS", "DURATION_UNITS", "format_bytes", "format_duration", "parse_bytes", "parse_duration"]

#: Multipliers of the accepted unit suffixes, keyed in lower case.  Decimal
#: prefixes (kB, MB, ...) are powers of 1000 and binary prefixes (KiB, MiB,
#: ...) powers of 1024, as in dask.
BYTE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "p": 10**15,
    "pb": 10**15,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "pib": 2**50,
}

_SIZE_RE = re.compile(
    r"""^\s*
    (?P<number>[0-9][0-9_]*(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?
      |\.[0-9]+(?:[eE][+-]?[0-9]+)?)
    \s*
    (?P<unit>[a-zA-Z]*)
    \s*$""",
    re.VERBOSE,
)


def parse_bytes(value: int | float | str) -> int:
    """Convert a size to a whole number of bytes.

    Parameters
    ----------
    value
        An ``int`` (bytes), a finite non-negative ``float`` such as ``4e9``,
        or a string made of a number and an optional unit: ``"4 GiB"``,
        ``"500MB"``, ``"1.5 gb"``, ``"4e9"``, ``"2048"``.  Units are case
        insensitive; ``k``/``kB``, ``M``/``MB``... are decimal and
        ``KiB``, ``MiB``... binary.

    Returns
    -------
    int
        The size in bytes, rounded to the nearest byte.

    Raises
    ------
    ValueError
        If the value is negative, not finite, a boolean, has an unknown unit
        or cannot be read as a size.  The message says what was expected.

    Examples
    --------
    >>> parse_bytes("4 GiB")
    4294967296
    >>> parse_bytes("500MB")
    500000000
    >>> parse_bytes(4e9)
    4000000000
    """
    # bool is a subclass of int; "memory_limit: yes" is never meant as 1 byte
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as '4 GiB', got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative, got {value!r}")
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"a size must be a finite non-negative number, got {value!r}")
        return int(round(value))
    if not isinstance(value, str):
        raise ValueError(f"expected a size such as '4 GiB', got {value!r}")

    match = _SIZE_RE.match(value)
    if match is None:
        raise ValueError(f"expected a size such as '4 GiB' or '500MB', got {value!r}")
    unit = match.group("unit").lower()
    if unit not in BYTE_UNITS:
        raise ValueError(
            f"unknown size unit {match.group('unit')!r} in {value!r}; "
            "use B, kB, MB, GB, TB, KiB, MiB, GiB or TiB"
        )
    try:
        # Decimal keeps "1.1 GB" exact instead of 1099999999.9999998 bytes
        number = Decimal(match.group("number").replace("_", ""))
    except InvalidOperation as exc:  # pragma: no cover - the regex prevents this
        raise ValueError(f"expected a size such as '4 GiB', got {value!r}") from exc
    return int((number * BYTE_UNITS[unit]).to_integral_value())


def format_bytes(n: int) -> str:
    """Format a number of bytes for humans, with binary units.

    Parameters
    ----------
    n
        Number of bytes.

    Returns
    -------
    str
        For example ``"4.00 GiB"`` or ``"123 B"``.
    """
    return _dask_format_bytes(int(n))


#: Seconds in each duration unit :func:`parse_duration` accepts, keyed in lower case.
DURATION_UNITS: dict[str, float] = {
    "": 1, "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
    "w": 7 * 86400, "week": 7 * 86400, "weeks": 7 * 86400,
}

_DURATION_RE = re.compile(r"^\s*(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>[a-zA-Z]*)\s*$")


def parse_duration(value: int | float | str) -> float:
    """Convert a duration to seconds: ``30``, ``"90s"``, ``"30min"``, ``"2h"``, ``"1d"``.

    Parameters
    ----------
    value
        A number of seconds, or a string of a number and an optional unit
        (s, min or m, h, d, w, and their long names).

    Returns
    -------
    float
        Seconds, 0 or more.

    Raises
    ------
    ValueError
        For a negative, non-finite or unreadable value, or an unknown unit.

    Examples
    --------
    >>> parse_duration("30min")
    1800.0
    >>> parse_duration(45)
    45.0
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as '30min', got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"a duration must be a finite number of seconds, 0 or more, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a duration such as '30min', got {value!r}")
    match = _DURATION_RE.match(value)
    if match is None:
        raise ValueError(f"expected a duration such as '30min', '2h' or 90, got {value!r}")
    unit = match.group("unit").lower()
    if unit not in DURATION_UNITS:
        raise ValueError(f"unknown duration unit {match.group('unit')!r} in {value!r}; use s, min, h, d or w")
    return float(match.group("number")) * DURATION_UNITS[unit]


def format_duration(seconds: float) -> str:
    """Format seconds for humans in the largest unit that divides them: ``"2h"``, ``"90min"``, ``"5s"``.

    Parameters
    ----------
    seconds
        The duration; non-whole seconds keep up to 3 decimals (``"0.5s"``).

    Examples
    --------
    >>> format_duration(7200)
    '2h'
    >>> format_duration(5400)
    '90min'
    """
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and float(seconds) % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{round(float(seconds), 3):g}s"

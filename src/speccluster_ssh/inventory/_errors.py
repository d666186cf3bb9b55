"""The single exception type of the inventory package, and source locations."""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["InventoryError", "Origin"]


@dataclass(frozen=True)
class Origin:
    """Where a value was read from: a file and, when known, a 1-based line.

    Parameters
    ----------
    file
        Path of the file as it should be shown to the user.
    line
        Line number (1-based) or ``None`` when the format does not tell.
    """

    file: str
    line: int | None = None

    def __str__(self) -> str:
        return self.file if self.line is None else f"{self.file}:{self.line}"


class InventoryError(Exception):
    """An inventory cannot be read or holds an invalid value.

    ``str()`` of the exception is always a single line that says what is
    wrong, where (file and line when known, host, variable) and how to fix
    it, so command line tools can print it as is.

    Parameters
    ----------
    message
        What is wrong and how to fix it.
    origin
        Optional location, prefixed to the message as ``file:line: ``.
    """

    def __init__(self, message: str, origin: Origin | None = None) -> None:
        # newlines would break the one-line contract (YAML errors contain them)
        text = re.sub(r"\s*[\r\n]+\s*", " ", str(message)).strip()
        if origin is not None:
            text = f"{origin}: {text}"
        super().__init__(text)
        self.origin = origin

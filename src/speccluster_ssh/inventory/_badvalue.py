"""The error of an inventory value that does not fit (shared by the value checkers and the variable table)."""

from __future__ import annotations


class BadValue(ValueError):
    """A variable value does not fit: says what was expected and how to fix it.

    Parameters
    ----------
    expected
        What the value must be, e.g. ``"a positive integer"``.
    fix
        A short hint, e.g. ``"write a whole number such as 2"``.
    """

    def __init__(self, expected: str, fix: str) -> None:
        super().__init__(expected)
        self.expected = expected
        self.fix = fix

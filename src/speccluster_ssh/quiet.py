"""Known third-party warnings that must not reach our users.

asyncssh still names cryptography's DSA types at import, and cryptography 51
deprecated them: every ``import asyncssh`` printed ten lines of
``CryptographyDeprecationWarning`` above our tables and in the middle of
command output.  We filter exactly that warning, by its message and by the
asyncssh modules it is attributed to, and nothing else; any other warning,
from asyncssh or from anyone, is still shown.
"""

from __future__ import annotations

import warnings

# (message regex, module regex): each entry is one known warning.
KNOWN_WARNINGS: tuple[tuple[str, str], ...] = (
    (r"DSA is deprecated", r"asyncssh(\..*)?$"),
)


def silence_known_warnings() -> None:
    """Install the narrow filters of :data:`KNOWN_WARNINGS` (idempotent)."""
    for message, module in KNOWN_WARNINGS:
        # Matched by message and module only: the warning's class lives in
        # cryptography, which this must not import just to name it.
        warnings.filterwarnings("ignore", message=message, category=Warning, module=module)

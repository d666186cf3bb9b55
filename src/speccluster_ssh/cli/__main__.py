"""``python -m speccluster_ssh.cli``: how the detached head process is started."""

from __future__ import annotations

from . import main

main()

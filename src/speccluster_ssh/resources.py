"""Files shipped inside the package: the local inventory and the playbooks.

They are package data (``speccluster_ssh/data/``), so they exist in a wheel
install as much as in a source checkout: ``speccluster-ssh up`` with no
inventory uses :func:`local_inventory`, and ``speccluster-ssh playbooks``
prints :func:`playbooks_dir`.

In the git checkout the files under ``data/`` are symbolic links to the
top-level ``inventories/local.yml`` and ``playbooks/``, which are the one
source of truth; building an sdist or a wheel copies their contents.

Zip safety: both functions return real paths on disk, because their callers
hand them to other programs (``ansible-playbook``, the ``up`` subprocess) or
read them with plain ``open``.  pip always installs a package as a
directory, so this holds for every normal install; were the package ever
imported from a zip archive, they raise :class:`SpecClusterError` with one
line saying so, instead of returning a path that does not exist.
"""

from __future__ import annotations

import pathlib
from importlib import resources

from .errors import SpecClusterError

_PACKAGE = "speccluster_ssh"


def _data_path(*parts: str) -> pathlib.Path:
    """The real path of ``data/<parts>`` inside the installed package."""
    traversable = resources.files(_PACKAGE).joinpath("data", *parts)
    # A directory install gives a pathlib.Path; a zip import gives a zipfile.Path,
    # whose files no other program can open.
    if not isinstance(traversable, pathlib.Path):
        raise SpecClusterError(
            f"speccluster_ssh is imported from an archive ({traversable}): its data files "
            "are not on disk; install it with pip (python3 -m pip install speccluster-ssh)"
        )
    if not traversable.exists():
        raise SpecClusterError(
            f"packaged file {traversable} is missing: the installation is incomplete; "
            "reinstall speccluster-ssh with pip"
        )
    return traversable


def local_inventory() -> pathlib.Path:
    """The packaged inventory of a cluster on this machine alone.

    Returns
    -------
    pathlib.Path
        ``speccluster_ssh/data/local.yml``: one host, ``localhost``, reached
        without SSH (``ansible_connection: local``).

    Raises
    ------
    SpecClusterError
        When the package is not installed as files on disk.
    """
    return _data_path("local.yml")


def playbooks_dir() -> pathlib.Path:
    """The directory of the packaged Ansible playbooks.

    Returns
    -------
    pathlib.Path
        ``speccluster_ssh/data/playbooks``: ``provision.yml``, ``check.yml``,
        ``teardown.yml`` and their ``README.md``.

    Raises
    ------
    SpecClusterError
        When the package is not installed as files on disk.
    """
    return _data_path("playbooks")

"""``playbooks``: where the installed package keeps its Ansible playbooks.

The playbooks ship inside the package (:mod:`speccluster_ssh.resources`), so
a wheel install has them too; this command prints their directory, or copies
them out to edit them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from .. import resources
from ..errors import UserError
from ..messages import PROG
from .common import main


@main.command()
@click.option("--copy", "dest", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Copy the playbooks and their README into DIR (created if missing).")
@click.option("--force", is_flag=True, help="With --copy: overwrite files of the same name in DIR.")
def playbooks(dest: Path | None, force: bool) -> None:
    """Print the directory of the shipped provisioning playbooks.

    \b
    Example:
      ansible-playbook -i lab.yml "$(speccluster-ssh playbooks)/provision.yml"
      speccluster-ssh playbooks --copy ./playbooks
    """
    source = resources.playbooks_dir()
    if dest is None:
        click.echo(str(source))
        return
    for path in copy_playbooks(source, dest, force=force):
        click.echo(str(path))


def copy_playbooks(source: Path, dest: Path, *, force: bool = False) -> list[Path]:
    """Copy the files of ``source`` into ``dest``; return the paths written.

    Raises
    ------
    UserError
        When ``dest`` is not a directory, or already holds a file of the same
        name and ``force`` is false (nothing is copied then).
    """
    if dest.exists() and not dest.is_dir():
        raise UserError(f"--copy {dest}: not a directory; give a directory to copy the playbooks into")
    files = sorted(p for p in source.iterdir() if p.is_file())
    clashes = [dest / p.name for p in files if (dest / p.name).exists()]
    if clashes and not force:
        names = ", ".join(p.name for p in clashes)
        raise UserError(f"--copy {dest}: {names} already there; add --force to overwrite them "
                        f"({PROG} playbooks --copy {dest} --force), or choose another DIR")
    try:
        dest.mkdir(parents=True, exist_ok=True)
        written = []
        for path in files:
            # copyfile follows the source checkout's symlinks: the copies are plain files.
            written.append(Path(shutil.copyfile(path, dest / path.name)))
    except OSError as exc:
        raise UserError(f"--copy {dest}: {exc.strerror or exc}; choose a directory you can write") from None
    return written

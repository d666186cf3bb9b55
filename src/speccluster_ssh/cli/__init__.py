"""The ``speccluster-ssh`` command line.

``up`` starts a cluster from an inventory, in the foreground (Ctrl-C stops
it) or detached (``--detach``: a head process keeps the cluster object, its
healing and adaptive scaling alive, and serves a control socket).
``status``, ``scale``, ``adapt``, ``logs`` and ``down`` talk to that head
process; ``restart``, ``drain``, ``undrain`` and ``reload`` operate it;
``list`` shows the clusters known on this machine; ``inventory``, ``plan``
and ``check`` look at an inventory without starting a cluster; ``hosts``
shows who holds what on a shared lab.

The command line only parses arguments and presents results; the work is
done by the cluster, the head process (:mod:`speccluster_ssh.head`), the
control socket (:mod:`speccluster_ssh.control`), ``check``
(:mod:`speccluster_ssh.preflight`) and ``plan``
(:mod:`speccluster_ssh.planning`). Its modules:

- :mod:`.common`: the command group, shared options, finding a cluster;
- :mod:`.display`: tables, progress, status;
- :mod:`.inventory_commands`, :mod:`.lab` (``hosts``), :mod:`.lifecycle`,
  :mod:`.running`, :mod:`.operations`, :mod:`.files` and :mod:`.tools`
  (``run``, ``dashboard``): the commands, each registering itself on the group.

Every command registers in one way: ``@main.command()`` on its function,
run when this package imports its module. The registration then stands
beside the command's name and options, where a reader looks for it, and a
new command cannot be defined yet left off a separate list (a
``register(group)`` function per module was the other way; it only added
that list). ``--help`` lists the commands by name, whatever the import order.
"""

from __future__ import annotations

from . import files, inventory_commands, lab, lifecycle, operations, running, tools  # noqa: F401  (each registers its commands)
from .common import main
from .display import _new_text

__all__ = ["main", "_new_text"]

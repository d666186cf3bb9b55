"""What each module that acts on a cluster needs of it: one ``typing.Protocol`` per module.

:class:`~speccluster_ssh.cluster.SSHSpecCluster` is built from modules
(startup, reconcile, the healer, scaling, reporting, operations, reload, the
day-2 methods) that are handed the cluster back. They depend on the protocol
below named for them, never on the cluster's class, so the package has no
import cycle even counting imports under ``TYPE_CHECKING``: this module sits
below all of them and imports none of them.

Each protocol declares exactly the attributes its module reads or writes
(``tests/test_cluster_protocols.py`` checks both ways, and that the cluster
has each one). The cluster's parts that modules reach through it (its healer,
capacity, reports and operations) are protocols here too, of the methods
used through the cluster, and read-only properties, so that the cluster's
real parts (subtypes of them) match.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from distributed.core import Status
    from distributed.deploy.adaptive import Adaptive

    from .entries import EntrySettings
    from .hosts import HostTable
    from .inventory import HostSpec, Inventory
    from .placement import Target
    from .pool import AgentPool
    from .reach import ReachChoice
    from .tasks import TaskSet

__all__ = [
    "CapacityCluster", "CapacityPart", "Day2Cluster", "HealerCluster", "HealerPart", "IdleCluster", "LogKeeper",
    "OperationsCluster", "OperationsLock", "PowerCluster", "PowerPart", "ReconcileCluster", "ReloadCluster",
    "ReportsCluster", "SpecState", "StartupCluster",
]


# -- the cluster's parts, as the modules see them through it ---------------------------------------
class HealerPart(Protocol):
    """The healer (:class:`~speccluster_ssh.healer.Healer`), as the other modules use it."""

    def unavailable_hosts(self) -> set[str]: ...
    def waiting(self, key: Any) -> bool: ...
    def problem(self, key: Any) -> str: ...
    def wake(self, why: str = "") -> None: ...
    def watch(self, process: Any) -> None: ...
    def entry_started(self, key: Any, host: str) -> None: ...
    def entry_start_failed(self, key: Any, error: str) -> None: ...
    def worker_left(self, key: Any, proc: Any, member: str) -> None: ...


class CapacityPart(Protocol):
    """The capacity arithmetic (:class:`~speccluster_ssh.scaling.Capacity`), as the other modules use it."""

    target: Target | None

    def remember_target(self) -> Target: ...
    def refill(self) -> None: ...
    def refresh_adapt(self, adaptive: Any) -> None: ...


class LogKeeper(Protocol):
    """The reports (:class:`~speccluster_ssh.reporting.Reports`): they keep a gone process's logs."""

    def keep_logs(self, worker: Any) -> None: ...


class PowerPart(Protocol):
    """The power keeper (:class:`~speccluster_ssh.powerctl.PowerKeeper`), as the other modules use it."""

    def report(self, name: str) -> dict[str, Any]: ...


class OperationsLock(Protocol):
    """The operations of a cluster (:class:`~speccluster_ssh.operations.Operations`): one runs at a time."""

    lock: asyncio.Lock


# -- the spec state every module reads ------------------------------------------------------------
class SpecState(Protocol):
    """SpecCluster's state: the spec, the processes that run it, the scheduler; and the cluster's log."""

    status: Status
    worker_spec: dict[Any, Any]
    workers: dict[Any, Any]
    scheduler: Any
    scheduler_info: dict[str, Any]

    @property
    def name(self) -> str: ...

    def log_event(self, message: str, *, echo: bool = True) -> None: ...


# -- one protocol per module ----------------------------------------------------------------------
class HealerCluster(SpecState, Protocol):
    """The cluster, as :mod:`speccluster_ssh.healer` uses it."""

    entry_settings: EntrySettings
    worker_hosts: dict[str, HostSpec]
    placement_policy: str
    new_spec: dict[str, Any]
    scheduler_comm: Any
    @property
    def reports(self) -> LogKeeper: ...

    @property
    def spec_lock(self) -> asyncio.Lock: ...

    async def reconcile_and_log(self) -> None: ...
    def slot_limits(self) -> dict[str, int]: ...
    def forget_short_entry(self, key: Any) -> None: ...


class ReconcileCluster(SpecState, Protocol):
    """The cluster, as :mod:`speccluster_ssh.reconcile` uses it."""

    scheduler_comm: Any
    pool: AgentPool
    tasks: TaskSet
    @property
    def healer(self) -> HealerPart: ...
    @property
    def reports(self) -> LogKeeper: ...
    start_errors: dict[Any, str]

    def track(self, processes: Iterable[Any]) -> None: ...
    async def reconcile_and_log(self) -> None: ...


class CapacityCluster(SpecState, Protocol):
    """The cluster, as :mod:`speccluster_ssh.scaling` uses it."""

    entry_settings: EntrySettings
    worker_hosts: dict[str, HostSpec]
    placement_policy: str
    new_spec: dict[str, Any]
    @property
    def host_table(self) -> HostTable: ...

    @property
    def total_slots(self) -> int: ...

    def unavailable_hosts(self) -> set[str]: ...
    def next_entry(self) -> dict[str, Any] | None: ...
    def slot_limits(self) -> dict[str, int]: ...


class ReportsCluster(SpecState, Protocol):
    """The cluster, as :mod:`speccluster_ssh.reporting` uses it."""

    cluster_id: str
    worker_hosts: dict[str, HostSpec]
    scheduler_comm: Any
    @property
    def host_table(self) -> HostTable: ...
    @property
    def healer(self) -> HealerPart: ...
    @property
    def power(self) -> PowerPart: ...
    min_workers: int

    @property
    def scheduler_address(self) -> str: ...
    @property
    def dashboard_link(self) -> str: ...
    @property
    def capacity_note(self) -> str: ...

    def processes(self) -> list[Any]: ...


class StartupCluster(SpecState, Protocol):
    """The cluster, as :mod:`speccluster_ssh.startup` uses it while it is put together and started."""

    inventory: Inventory
    entry_settings: EntrySettings
    worker_hosts: dict[str, HostSpec]
    new_spec: dict[str, Any]
    scheduler_spec: dict[str, Any]
    scheduler_options: dict[str, Any]
    given_scheduler_address: str | None
    reach: ReachChoice | None
    reach_setting: str
    pool: AgentPool
    @property
    def host_table(self) -> HostTable: ...
    @property
    def capacity(self) -> CapacityPart: ...
    min_workers: int
    min_workers_asked: int | float | str | None
    start_errors: dict[Any, str]
    start_timeout: float

    @property
    def total_slots(self) -> int: ...

    def next_entry(self) -> dict[str, Any] | None: ...
    def reconcile_now(self) -> Awaitable[None]: ...


class OperationsCluster(SpecState, Protocol):
    """The cluster, as :mod:`speccluster_ssh.operations` uses it."""

    entry_settings: EntrySettings
    worker_hosts: dict[str, HostSpec]
    placement_policy: str
    new_spec: dict[str, Any]
    pool: AgentPool
    @property
    def host_table(self) -> HostTable: ...
    @property
    def healer(self) -> HealerPart: ...
    @property
    def capacity(self) -> CapacityPart: ...
    @property
    def operations(self) -> OperationsLock: ...
    start_errors: dict[Any, str]
    start_timeout: float

    def processes(self) -> list[Any]: ...
    def take_entry_name(self, taken: Collection[str] = ()) -> str: ...
    def reconcile_now(self) -> Awaitable[None]: ...


class ReloadCluster(OperationsCluster, Protocol):
    """The cluster, as :mod:`speccluster_ssh.reload` uses it (with :mod:`speccluster_ssh.operations`' steps)."""

    inventory: Inventory

    def running_adaptive(self) -> Adaptive | None: ...


class Day2Cluster(ReloadCluster, Protocol):
    """The cluster, as the day-2 methods (:mod:`speccluster_ssh.day2`) use it: they run in its event loop."""

    def sync(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any: ...


class SharingCluster(SpecState, Protocol):
    """The cluster, as :mod:`speccluster_ssh.sharing` uses it."""

    tasks: TaskSet

    def regrow(self) -> int: ...
    def member_names_of(self, entry: str) -> list[str]: ...
    async def yield_workers(self, names: Sequence[str]) -> None: ...
    def running_adaptive(self) -> Any: ...


class PowerCluster(OperationsCluster, Protocol):
    """The cluster, as :mod:`speccluster_ssh.powerctl` uses it: it drains a host (:mod:`speccluster_ssh.operations`) before powering it off."""


class IdleCluster(SpecState, Protocol):
    """The cluster, as :mod:`speccluster_ssh.idle` uses it."""

    scheduler_comm: Any
    scheduler_options: dict[str, Any]

    async def close_in_loop(self) -> None: ...

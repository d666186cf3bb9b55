"""The idle policy and its parts, without a lab (issue 25, part 3): an idle cluster ends itself.

The lab tests (``test_idle_lab.py``) end real clusters; here the pure
policy (:class:`IdleClock`), durations, the scheduler-side preload (on a
fake scheduler and on a real one in this process), the settings, and what
``list`` shows of a cluster that ended by itself.
"""

from __future__ import annotations

import asyncio
import types
from pathlib import Path
from typing import Any

import dask
import pytest
from click.testing import CliRunner

from speccluster_ssh import postmortem
from speccluster_ssh import state as st
from speccluster_ssh.cli import main
from speccluster_ssh.cli.lifecycle import _cell, _ended_rows
from speccluster_ssh.errors import UserError
from speccluster_ssh.head import UpOptions
from speccluster_ssh.idle import (
    ACTIVITY_HANDLER,
    ACTIVITY_PRELOAD,
    Activity,
    IdleClock,
    idle_reason,
    poll_interval,
    resolve_idle_timeout,
    scheduler_idle_timeout,
    with_activity_preload,
)
from speccluster_ssh.units import format_duration, parse_duration


# -- durations ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "seconds"), [
    ("2h", 7200.0), ("30min", 1800.0), ("30m", 1800.0), ("5s", 5.0), ("5", 5.0), (" 1.5 d ", 129600.0),
    ("2 Hours", 7200.0), ("1w", 604800.0), (0, 0.0), (2.5, 2.5),
])
def test_durations_are_read(text: Any, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["h", "-1", "-1s", "2x", "two hours", "", True, None, float("inf"), -3, "1e400h"])
def test_bad_durations_say_what_was_expected(bad: Any) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


@pytest.mark.parametrize(("seconds", "text"), [(7200, "2h"), (5400, "90min"), (5, "5s"), (0.5, "0.5s"), (86400, "1d"),
                                               (90, "90s")])
def test_durations_are_shown_in_the_largest_unit_that_divides_them(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


def test_the_reason_names_the_timeout() -> None:
    assert idle_reason(7200) == "idle for 2h"
    assert idle_reason(5) == "idle for 5s"


# -- the policy -----------------------------------------------------------------------------------
def test_a_cluster_nobody_uses_is_idle_from_its_start() -> None:
    clock = IdleClock(10, now=100)
    assert not clock.observe(Activity(quiet_for=1000), now=105)
    assert clock.idle_for(105) == 5
    assert clock.observe(Activity(quiet_for=1000), now=110)


def test_a_connected_client_keeps_it_alive() -> None:
    clock = IdleClock(10, now=0)
    for now in range(1, 60):
        assert not clock.observe(Activity(clients=1), now=now)
    # Counted from the last reading that saw the client.
    assert not clock.observe(Activity(quiet_for=100), now=65)
    assert clock.observe(Activity(quiet_for=100), now=69)


def test_a_running_task_keeps_it_alive_without_a_client() -> None:
    clock = IdleClock(10, now=0)
    assert not any(clock.observe(Activity(tasks=1), now=t) for t in range(1, 60))
    assert not clock.observe(Activity(quiet_for=0.0), now=60)
    assert clock.observe(Activity(quiet_for=10.0), now=70)


def test_a_busy_scheduler_counts_as_activity() -> None:
    clock = IdleClock(10, now=0)
    assert not clock.observe(Activity(quiet_for=None), now=30)  # the scheduler says it is busy
    assert clock.active_at == 30


def test_work_between_two_readings_counts() -> None:
    """A computation that started and ended between two readings: the scheduler's own quiet time tells."""
    clock = IdleClock(10, now=0)
    assert not clock.observe(Activity(quiet_for=2), now=11)  # active until 9
    assert clock.active_at == 9
    assert clock.observe(Activity(quiet_for=10), now=19)


def test_an_older_quiet_time_never_moves_the_last_activity_back() -> None:
    clock = IdleClock(10, now=50)  # the start: a scheduler quiet since before it does not count earlier
    assert not clock.observe(Activity(quiet_for=1000), now=55)
    assert clock.active_at == 50


def test_a_reading_that_failed_counts_as_activity() -> None:
    clock = IdleClock(10, now=0)
    assert not clock.observe(None, now=20)
    assert not clock.observe(Activity(quiet_for=100), now=29)
    assert clock.observe(Activity(quiet_for=100), now=30)


def test_polls_are_frequent_enough_for_short_timeouts_and_few_for_long_ones() -> None:
    assert poll_interval(5) == 0.5
    assert poll_interval(1) == 0.25
    assert poll_interval(7200) == 10.0


def test_activity_from_a_reply() -> None:
    assert Activity.from_reply({"tasks": 2, "clients": 1, "quiet_for": None}) == Activity(2, 1, None)
    assert Activity.from_reply({"tasks": 0, "clients": 0, "quiet_for": -0.1}) == Activity(0, 0, 0.0)
    assert not Activity.from_reply({"tasks": 0, "clients": 0, "quiet_for": 3.0}).busy


# -- the scheduler side -----------------------------------------------------------------------------
def _handler_on(scheduler: Any) -> Any:
    namespace: dict[str, Any] = {}
    exec(compile(ACTIVITY_PRELOAD, "preload", "exec"), namespace)  # what distributed does with a text preload
    namespace["dask_setup"](scheduler)
    return scheduler.handlers[ACTIVITY_HANDLER]


def test_the_preload_counts_tasks_and_clients_but_not_fire_and_forget() -> None:
    worker = types.SimpleNamespace(processing={"a": 1, "b": 2})
    fake = types.SimpleNamespace(
        workers={"w": worker, "v": types.SimpleNamespace(processing={})}, queued=["q"], unrunnable={},
        clients={"fire-and-forget": None, "Client-1": None}, idle_since=None, handlers={},
    )
    assert _handler_on(fake)() == {"tasks": 3, "clients": 1, "quiet_for": None}
    fake.clients = {"fire-and-forget": None}
    worker.processing = {}
    fake.queued = []
    import time

    fake.idle_since = time.time() - 30
    reply = _handler_on(fake)()
    assert reply["tasks"] == 0 and reply["clients"] == 0 and 29 < reply["quiet_for"] < 60


def test_a_real_scheduler_answers_with_its_clients() -> None:
    """The preload on the installed distributed (CI's oldest too): the handler answers over the wire."""
    from distributed import Client, Scheduler
    from distributed.core import rpc

    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        async with Scheduler(
            port=0, dashboard_address=":0", preload=with_activity_preload({})["preload"]
        ) as scheduler:
            async with rpc(scheduler.address) as comm:
                alone = await getattr(comm, ACTIVITY_HANDLER)()
                async with Client(scheduler.address, asynchronous=True):
                    with_client = await getattr(comm, ACTIVITY_HANDLER)()
        return alone, with_client

    alone, with_client = asyncio.run(main())
    assert (alone["tasks"], alone["clients"]) == (0, 0)
    assert with_client["clients"] == 1


def test_the_preload_joins_the_configured_and_given_ones() -> None:
    with dask.config.set({"distributed.scheduler.preload": ["mine"]}):
        assert with_activity_preload({})["preload"] == ["mine", ACTIVITY_PRELOAD]
        assert with_activity_preload({"preload": "given"})["preload"] == ["given", ACTIVITY_PRELOAD]
    assert with_activity_preload({"preload": ["a", "b"], "x": 1}) == {"preload": ["a", "b", ACTIVITY_PRELOAD], "x": 1}
    assert " " in ACTIVITY_PRELOAD  # distributed takes a preload with a space for source text, not a module name


# -- settings ---------------------------------------------------------------------------------------
def test_idle_timeout_from_argument_or_config() -> None:
    assert resolve_idle_timeout("2h") == 7200
    assert resolve_idle_timeout(0) == 0
    assert resolve_idle_timeout(None) == 0  # the shipped default: never
    with dask.config.set({"speccluster-ssh.idle-timeout": "30min"}):
        assert resolve_idle_timeout(None) == 1800
        assert resolve_idle_timeout(0) == 0  # given: wins over the config
    with dask.config.set({"speccluster-ssh.idle-timeout": "soon"}), pytest.raises(UserError, match="config speccluster"):
        resolve_idle_timeout(None)
    with pytest.raises(UserError, match="idle_timeout.*duration"):
        resolve_idle_timeout("-5s")


def test_distributed_own_idle_timeout_is_found() -> None:
    assert scheduler_idle_timeout({}) == 0
    assert scheduler_idle_timeout({"idle_timeout": "1h"}) == 3600
    with dask.config.set({"distributed.scheduler.idle-timeout": "2 minutes"}):
        assert scheduler_idle_timeout({}) == 120


def test_up_options_carry_the_idle_timeout() -> None:
    options = UpOptions(name="lab", inventory="lab.yml", idle_timeout=7200.0)
    assert UpOptions.from_json(options.to_json()).idle_timeout == 7200.0
    assert UpOptions.from_json(UpOptions(name="x", inventory="y").to_json()).idle_timeout is None


def test_a_bad_idle_timeout_is_one_line_exit_2(state_home: Path) -> None:
    result = CliRunner().invoke(main, ["up", "--idle-timeout", "soon"])
    assert result.exit_code == 2, result.output
    assert "--idle-timeout" in result.output and "duration" in result.output
    assert "Traceback" not in result.output
    assert not state_home.exists() or not any(p for p in state_home.iterdir() if not p.name.startswith("."))


# -- what list shows --------------------------------------------------------------------------------
def test_list_says_why_a_cluster_ended_by_itself(state_home: Path, tmp_path: Path) -> None:
    directory = tmp_path / "gone"
    directory.mkdir()
    idle = st.ClusterState(name="lab", pid=1, inventory="lab.yml", cluster_id="lab-1234", hosts={"h1": "10.0.0.1"})
    down = st.ClusterState(name="other", pid=2, inventory="lab.yml", cluster_id="other-1", hosts={"h1": "10.0.0.1"})
    assert postmortem.keep_record(st.KnownCluster(idle, directory, alive=False), 3600, reason="idle for 2h")
    assert postmortem.keep_record(st.KnownCluster(down, directory, alive=False), 3600)
    rows = {r["name"]: r for r in _ended_rows(set())}
    assert (rows["lab"]["status"], rows["lab"]["reason"]) == ("ended", "idle for 2h")
    assert (rows["other"]["status"], rows["other"]["reason"]) == ("ended", "")
    assert _cell(rows["lab"], "status") == "ended (idle for 2h)"
    assert _cell(rows["other"], "status") == "ended"
    assert _cell(rows["lab"], "pid") == ""
    result = CliRunner().invoke(main, ["list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "ended (idle for 2h)" in result.output

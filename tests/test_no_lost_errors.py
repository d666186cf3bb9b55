"""A host killed during a computation loses no error on the head (lab).

The first version printed "Task exception was never retrieved …
HostAgent._read_loop … ConnectionLost" when a host died under a running
computation. Here a host's every process (sshd included) is SIGKILLed while
a client computes; the cluster moves the host's entry, retries the host and
takes it back when its sshd returns. Meanwhile the test records:

- every call of the loop's exception handler (asyncio's default handler is
  what prints "Task/Future exception was never retrieved");
- records of the ``asyncio`` logger at ERROR (where that default handler
  writes, whatever loop it ran for);
- errors a finalizer swallowed ("Exception ignored in ...",
  ``sys.unraisablehook``);
- records of ``speccluster_ssh`` at ERROR: a background task that failed is
  logged there (:mod:`speccluster_ssh.tasks`), and none should fail here.

Any of these fails the test, as do wrong results.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from distributed import Client

from test_peer import DEADLINE, host_of, inventory, lab_cluster, lab_host, names, run, slowinc, until

pytestmark = pytest.mark.lab


class Lost:
    """What the head would have printed about errors nobody handled."""

    def __init__(self) -> None:
        self.handler_calls: list[dict[str, Any]] = []
        self.unraisable: list[str] = []
        self.records: list[logging.LogRecord] = []

    def loop_handler(self, _loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.handler_calls.append(context)

    def check(self) -> None:
        """Fail if anything was recorded so far."""
        # "never retrieved" is reported when the task or future is collected;
        # the loop keeps our handler after it closed.
        gc.collect()
        problems = self.problems()
        assert not problems, "\n".join(problems)

    def problems(self) -> list[str]:
        out = [f"loop exception handler: {c.get('message')}: {c.get('exception')!r}" for c in self.handler_calls]
        out += [f"unraisable: {u}" for u in self.unraisable]
        out += [f"{r.name} {r.levelname}: {r.getMessage()}" for r in self.records]
        return out


class Keep(logging.Handler):
    def __init__(self, into: list[logging.LogRecord]) -> None:
        super().__init__(logging.ERROR)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record)


@pytest.fixture
def lost() -> Iterator[Lost]:
    """Records lost errors while the test runs; the test calls :meth:`Lost.check`."""
    seen = Lost()
    loggers = [logging.getLogger("asyncio"), logging.getLogger("speccluster_ssh")]
    handler = Keep(seen.records)
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        if lg.getEffectiveLevel() > logging.ERROR:
            lg.setLevel(logging.ERROR)
    old_hook = sys.unraisablehook
    sys.unraisablehook = lambda u: seen.unraisable.append(f"{u.exc_type.__name__}: {u.exc_value} in {u.object!r}")
    try:
        yield seen
    finally:
        sys.unraisablehook = old_hook
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)


def test_host_killed_during_a_computation_loses_no_error(lab: Any, tmp_path: Path, lost: Lost) -> None:
    path = inventory(lab, tmp_path, {"h1": {}, "h2": {}, "h3": {}})

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lost.loop_handler)
        async with lab_cluster(lab, path, n_workers=2, silence=3) as (cluster, _):
            await until(lambda: names(cluster) == set(cluster.worker_spec), DEADLINE, "two workers")
            used = {host_of(cluster, k) for k in cluster.worker_spec}
            [moved] = [k for k in cluster.worker_spec if host_of(cluster, k) != "h1"]
            victim = lab_host(lab, host_of(cluster, moved))
            [spare] = {"h1", "h2", "h3"} - used
            async with Client(cluster, asynchronous=True) as client:
                inputs = list(range(60))
                futures = client.map(slowinc, inputs, delay=0.2, pure=False)
                await until(lambda: sum(f.done() for f in futures) >= 5, DEADLINE, "the computation to be under way")
                # Every process of the host, its sshd too: the head's SSH connection drops.
                await asyncio.to_thread(victim.kill_all)
                try:
                    results = await asyncio.wait_for(client.gather(futures), 120)
                    assert results == [x + 1 for x in inputs]
                    state = cluster.pool.states[victim.name]
                    await until(lambda: state.state == "down", 30, f"{victim.name} to be marked down")
                    await until(
                        lambda: host_of(cluster, moved) == spare and names(cluster) == set(cluster.worker_spec),
                        DEADLINE,
                        f"entry {moved} to run on {spare}",
                    )
                    # A retry that fails goes through the same paths as the loss.
                    await until(lambda: len(state.failures) >= 2, 30, f"{victim.name} to be retried")
                finally:
                    await asyncio.to_thread(victim.restart_sshd)
                await until(lambda: cluster.pool.states[victim.name].state == "up", DEADLINE, f"{victim.name} back")
                again = await asyncio.wait_for(client.gather(client.map(slowinc, inputs, delay=0.0, pure=False)), 60)
                assert again == [x + 1 for x in inputs]
                assert names(cluster) == set(cluster.worker_spec)

    run(main())
    lost.check()

"""The background task helper: references kept, failures logged, close waits."""

from __future__ import annotations

import asyncio
import gc
import logging
import weakref

import pytest

from speccluster_ssh.tasks import TaskSet, log_failures


def test_a_failed_task_is_logged_with_its_name(caplog: pytest.LogCaptureFixture) -> None:
    async def boom() -> None:
        raise RuntimeError("the host went away")

    async def main() -> None:
        tasks = TaskSet("head test")
        tasks.start(boom(), name="read loop of h1")
        await asyncio.sleep(0.01)
        assert len(tasks) == 0  # a finished task is dropped from the set
        await tasks.close()

    unretrieved: list[dict[str, object]] = []
    loop = asyncio.new_event_loop()
    loop.set_exception_handler(lambda _loop, context: unretrieved.append(context))
    with caplog.at_level(logging.ERROR, logger="speccluster_ssh.tasks"):
        loop.run_until_complete(main())
    loop.close()
    gc.collect()
    (record,) = [r for r in caplog.records if "failed" in r.getMessage()]
    assert "head test" in record.getMessage()
    assert "'read loop of h1'" in record.getMessage()
    assert "RuntimeError: the host went away" in record.getMessage()
    assert record.exc_info is not None
    assert unretrieved == []  # asyncio never had to say "exception was never retrieved"


def test_close_cancels_and_awaits_running_tasks(caplog: pytest.LogCaptureFixture) -> None:
    events: list[str] = []

    async def slow_cleanup() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            events.append("cancelled")
            await asyncio.sleep(0.05)  # cleanup that takes a while
            events.append("cleaned up")
            raise

    async def main() -> None:
        tasks = TaskSet("owner")
        task = tasks.start(slow_cleanup(), name="slow")
        await asyncio.sleep(0.01)
        await tasks.close()
        # close returned only after the task finished its cleanup
        assert events == ["cancelled", "cleaned up"]
        assert task.cancelled()
        assert len(tasks) == 0

    with caplog.at_level(logging.DEBUG, logger="speccluster_ssh.tasks"):
        asyncio.run(main())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # a cancel is no failure


def test_close_with_timeout_reports_a_task_that_does_not_end(caplog: pytest.LogCaptureFixture) -> None:
    release = asyncio.Event

    async def stubborn(gate: asyncio.Event) -> None:
        while not gate.is_set():
            try:
                await gate.wait()
            except asyncio.CancelledError:
                continue  # ignores cancel until released

    async def main() -> None:
        gate = release()
        tasks = TaskSet("owner")
        task = tasks.start(stubborn(gate), name="stubborn")
        await asyncio.sleep(0.01)
        await tasks.close(timeout=0.05)
        assert not task.done()
        gate.set()
        await task

    with caplog.at_level(logging.WARNING, logger="speccluster_ssh.tasks"):
        asyncio.run(main())
    assert any("'stubborn' did not end" in r.getMessage() for r in caplog.records)


def test_the_set_keeps_a_reference() -> None:
    """A task that only the set holds survives a garbage collection and runs to its end.

    The task waits on a future that nothing else holds: then the event loop
    keeps no strong reference to it (asyncio's task registry is weak), and
    only the set stands between the task and the collector. A task sleeping
    in ``asyncio.sleep`` would prove nothing, the loop's timer holds it.
    """
    waiting: list[weakref.ref[asyncio.Future[None]]] = []
    finished: list[str] = []

    async def wait_for_nobody() -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiting.append(weakref.ref(future))
        await future
        finished.append("done")

    async def main() -> None:
        tasks = TaskSet("owner")
        task = weakref.ref(tasks.start(wait_for_nobody(), name="waits on a future nobody holds"))
        await asyncio.sleep(0)  # the task runs up to its await
        assert waiting, "the task did not start"
        gc.collect()
        alive = task()
        assert alive is not None, "the task was collected: the set keeps no reference to it"
        future = waiting[0]()
        assert future is not None
        future.set_result(None)
        await asyncio.wait_for(alive, 5)
        assert finished == ["done"]
        assert len(tasks) == 0  # and it leaves the set when it ends
        await tasks.close()

    asyncio.run(main())


def test_log_failures_logs_each_exception_and_lets_ctrl_c_through(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("speccluster_ssh.test")
    with caplog.at_level(logging.DEBUG, logger="speccluster_ssh.test"):
        found = log_failures([1, OSError("refused"), asyncio.CancelledError()], ["h1", "h2", "h3"], log, "closing")
    assert [type(e) for e in found] == [OSError, asyncio.CancelledError]
    messages = [r.getMessage() for r in caplog.records]
    assert "closing: h2 failed: OSError: refused" in messages
    assert "closing: h3 was cancelled" in messages
    with pytest.raises(KeyboardInterrupt):
        log_failures([KeyboardInterrupt()], ["h1"], log, "closing")


def test_a_task_whose_outcome_the_caller_reads_is_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def boom() -> None:
        raise ValueError("read by the caller")

    async def main() -> None:
        tasks = TaskSet("owner")
        task = tasks.start(boom(), name="start", log_failure=False)
        await asyncio.wait([task])
        with pytest.raises(ValueError):
            task.result()
        await tasks.close()

    with caplog.at_level(logging.DEBUG, logger="speccluster_ssh.tasks"):
        asyncio.run(main())
    assert caplog.records == []

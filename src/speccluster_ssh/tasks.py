"""Background tasks that are never lost.

Every background task of the head is started through a :class:`TaskSet`. It
keeps a reference to each task (the event loop keeps only a weak one), logs
the exception of a task that ends with one, naming the task, and on
:meth:`TaskSet.close` cancels what still runs and waits for it. So no task
ends with "Task exception was never retrieved", and nothing keeps running
after its owner closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class TaskSet:
    """The background tasks of one owner (a head, a control server, a cluster).

    Parameters
    ----------
    owner
        Named in log lines, e.g. ``"head lab"``.
    log
        The logger that reports failed tasks (default: this module's).

    Examples
    --------
    >>> tasks = TaskSet("head")  # doctest: +SKIP
    >>> tasks.start(ticker(), name="progress ticker")  # doctest: +SKIP
    >>> await tasks.close()  # doctest: +SKIP
    """

    def __init__(self, owner: str, log: logging.Logger | None = None) -> None:
        self.owner = owner
        self._log = log or logger
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def start(self, coro: Coroutine[Any, Any, T], *, name: str, log_failure: bool = True) -> asyncio.Task[T]:
        """Run ``coro`` as a task of this set and return the task.

        Parameters
        ----------
        coro
            The coroutine to run.
        name
            What the task does, used as the task's name and in log lines.
        log_failure
            ``False`` when the caller reads the task's outcome itself
            (``task.result()``) and reports it; the task is still kept and
            cancelled and awaited at :meth:`close`.
        """
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._reap(done, log_failure))
        return task

    def _reap(self, task: asyncio.Task[Any], log_failure: bool = True) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()  # retrieving it is what keeps asyncio from complaining
        if exc is not None and log_failure:
            self._log.error(
                "%s: background task %r failed: %s: %s",
                self.owner, task.get_name(), type(exc).__name__, exc, exc_info=exc,
            )

    async def close(self, timeout: float | None = None) -> None:
        """Cancel every task still running and wait until each has ended.

        Parameters
        ----------
        timeout
            Seconds to wait for the cancelled tasks; ``None`` waits as long as
            they take. Tasks still running afterwards are logged.
        """
        pending = [t for t in self._tasks if not t.done()]
        for task in pending:
            task.cancel()
        if not pending:
            return
        # asyncio.wait neither raises the tasks' exceptions nor cancels them
        # again when we are cancelled ourselves; _reap logs their outcome.
        _, still = await asyncio.wait(pending, timeout=timeout)
        for task in still:
            self._log.warning("%s: background task %r did not end within %s s of its cancel",
                              self.owner, task.get_name(), timeout)


def log_failures(
    results: Iterable[Any], what: Iterable[str], log: logging.Logger, action: str
) -> list[BaseException]:
    """Log each exception among results of ``gather(..., return_exceptions=True)``.

    Parameters
    ----------
    results
        What ``gather`` returned.
    what
        A label per result (same order), e.g. host names.
    log
        Where to log.
    action
        What was gathered, e.g. ``"closing agents"``.

    Returns
    -------
    list of BaseException
        The exceptions found. A ``KeyboardInterrupt`` or ``SystemExit`` among
        them is raised again instead of being logged: Ctrl-C must reach the user.
    """
    failures: list[BaseException] = []
    for label, result in zip(what, results):
        if isinstance(result, (KeyboardInterrupt, SystemExit)):
            raise result
        if isinstance(result, BaseException):
            failures.append(result)
            if isinstance(result, asyncio.CancelledError):
                log.debug("%s: %s was cancelled", action, label)
            else:
                log.warning("%s: %s failed: %s: %s", action, label, type(result).__name__, result)
    return failures

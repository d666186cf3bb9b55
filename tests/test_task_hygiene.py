"""No background task of the head ends with an unretrieved exception (no lab needed).

Each test installs an asyncio exception handler that records what the
default handler would print ("Task exception was never retrieved", ...)
and fails when anything was recorded.
"""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from speccluster_ssh.agent import HostAgent
from speccluster_ssh.connection import ConnectSettings, HostConnection
from speccluster_ssh.inventory import Inventory


class ConnectionLostLike(Exception):
    """Like asyncssh's ConnectionLost: neither an OSError nor a ConnectionError."""


class BrokenChannel:
    """A channel whose reads fail as a killed host's do."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.closed = False

    async def readline(self) -> bytes:
        await asyncio.sleep(0)
        raise self.error

    def write(self, data: bytes) -> None:
        raise self.error

    def stderr_tail(self) -> str:
        return ""

    async def close(self) -> None:
        self.closed = True


def local_host() -> Any:
    spec = {"name": "here", "ansible_connection": "local", "speccluster_python": sys.executable}
    return Inventory.from_hosts([spec]).hosts["here"]


@pytest.fixture
def unhandled() -> Iterator[list[dict[str, Any]]]:
    """What asyncio's default exception handler would have printed during the test."""
    seen: list[dict[str, Any]] = []
    yield seen
    gc.collect()  # "never retrieved" is reported when the task is collected
    assert not seen, [c.get("message") for c in seen]


def run(coro: Any, seen: list[dict[str, Any]]) -> Any:
    loop = asyncio.new_event_loop()
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()
        gc.collect()


@pytest.mark.parametrize("error", [ConnectionLostLike("connection lost"), OSError("broken pipe"), ValueError("bad")])
def test_a_lost_channel_ends_the_read_loop_quietly(error: BaseException, unhandled: list[dict[str, Any]]) -> None:
    async def main() -> tuple[str | None, list[str]]:
        host = local_host()
        agent = HostAgent(HostConnection(host, ConnectSettings()), "c1", silence=0.8)
        agent._channel = BrokenChannel(error)  # type: ignore[assignment]
        lost: list[str] = []
        agent.on_lost(lost.append)
        agent._reader = agent._tasks.start(agent._read_loop(), name="read")
        agent._pinger = agent._tasks.start(agent._ping_loop(), name="ping")
        await asyncio.wait_for(agent._reader, 5)
        assert agent._reader.exception() is None
        await agent.close(timeout=2)
        return agent.lost_reason, lost

    reason, lost = run(main(), unhandled)
    assert reason is not None and str(error) in reason
    assert len(lost) == 1


def test_close_from_a_lost_callback_does_not_wait_for_itself(unhandled: list[dict[str, Any]]) -> None:
    async def main() -> None:
        agent = HostAgent(HostConnection(local_host(), ConnectSettings()), "c1")
        agent._channel = BrokenChannel(ConnectionLostLike("gone"))  # type: ignore[assignment]
        closing: list[asyncio.Task[None]] = []
        # A close started from inside the read loop's lost callback, as a task.
        agent.on_lost(lambda _reason: closing.append(asyncio.ensure_future(agent.close(timeout=2))))
        agent._reader = agent._tasks.start(agent._read_loop(), name="read")
        await asyncio.wait_for(agent._reader, 5)
        await asyncio.wait_for(asyncio.gather(*closing), 5)

    run(main(), unhandled)

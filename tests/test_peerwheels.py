"""The head's side of the fan-out (``peerwheels.py``) with scripted host answers: no lab, no SSH."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from envfakes import FakeWheel, fake_wheelhouse

from speccluster_ssh.peerwheels import PEER_SOURCE, PeerFanout
from speccluster_ssh.security import make_security
from speccluster_ssh.shipping import Wheelhouses


class ScriptedShipment:
    """Records what the head sends; answers from a script, as the host script would."""

    def __init__(self, host: str, answers: list[dict[str, Any]]) -> None:
        self.host = host
        self.answers = answers
        self.sent: list[dict[str, Any]] = []
        self.bytes_sent = 0
        self.closed = False

        async def close() -> None:
            self.closed = True

        self.channel = SimpleNamespace(stderr_tail=lambda: "", close=close)

    def say(self, label: str) -> None:
        pass

    def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    async def receive(self, timeout: float | None = None) -> dict[str, Any]:
        return self.answers.pop(0)

    async def send_wheel(self, wheel: Any) -> None:
        self.sent.append({"op": "wheel", "sha256": wheel.sha256})
        self.bytes_sent += wheel.size


def wheel(n: int) -> FakeWheel:
    return FakeWheel(f"w{n}-1.0-py3-none-any.whl", f"{n:064x}", 1000 * n, None)  # type: ignore[arg-type]


def test_a_failed_peer_fetch_is_made_up_by_the_head_and_servers_stop_with_the_phase() -> None:
    w1, w2 = wheel(1), wheel(2)
    house = fake_wheelhouse([w1, w2], ("w1==1.0", "w2==1.0"))
    _, tls = make_security(True, "peerwheels")
    fanout = PeerFanout(lambda: tls, direct=1)
    wheelhouses = Wheelhouses()
    fanout.install(wheelhouses)
    assert wheelhouses.extra_sources == (PEER_SOURCE,)
    got = [{"event": "got"}, {"event": "got"}]
    first = ScriptedShipment("h1", [*got, {"event": "serving", "address": ["10.0.0.11", 4001]},
                                    {"event": "stopped", "bytes_sent": 1000, "files_sent": 1, "refused": 0},
                                    {"event": "bye", "removed": []}])  # fmt: skip
    # h2's fetch from h1 brings w1, then breaks: the head sends w2 only; h2's server does not start.
    second = ScriptedShipment("h2", [{"event": "fetched", "got": [w1.sha256], "bytes": 1000, "error": "reset"},
                                     {"event": "got"}, {"event": "serve_failed", "why": "no address"}])  # fmt: skip

    async def main() -> None:
        async with fanout.step("h1"):
            async with fanout.step("h2"):
                await wheelhouses.source_for("h1", house).deliver(first, [w1, w2])
                assert fanout.hold("h1", first, house.fingerprint)  # it serves: its script is kept
                await wheelhouses.source_for("h2", house).deliver(second, [w1, w2])
                assert not fanout.hold("h2", second, house.fingerprint)
            assert not first.closed  # h1 is still in its step
        await fanout.close()

    plan = fanout.plan_of(house.fingerprint).plan
    asyncio.run(main())
    fetch = next(m for m in second.sent if m["op"] == "peer_fetch")
    assert (fetch["host"], fetch["port"]) == ("10.0.0.11", 4001)
    assert [m["sha256"] for m in second.sent if m["op"] == "wheel"] == [w2.sha256]
    assert plan.head_sends == 1 and plan.head_fallbacks == 1 and plan.peers["h1"].failures == 1
    assert first.bytes_sent == house.size and second.bytes_sent == w2.size and fanout.peer_bytes == {"h2": 1000}
    # The phase is over: h1's server was stopped, its script said bye, its channel closed.
    assert [m["op"] for m in first.sent[-2:]] == ["stop_serving", "bye"] and first.closed
    assert fanout.served == {"h1": {"bytes_sent": 1000, "files_sent": 1, "refused": 0}}
    assert "cert" in fetch["pems"] and fetch["pems"] == fanout.pems()

"""The head ships its environment to a host (``speccluster_environment: head``) before the agent starts there.

:func:`ensure_environment` opens one channel on the host's connection
(through its jump hosts like every channel), running the host's bare python
with the agent's bootstrap and the shipped script ``agent/envbuild.py``
(see there for the protocol). It learns the host's target, gets the
:class:`~speccluster_ssh.environments.Wheelhouse` for it from the cluster's
:class:`Wheelhouses` (gathered once per fingerprint, in a thread, shared by
every host of that target), sends the wheels the host lacks, has it build
the environment, and returns the python the agent then runs under.

Where a host's wheels come from is one swappable function,
:attr:`Wheelhouses.source_for`: :class:`FromHead` (frames over the host's
channel) by default; a peer fan-out plugs in there (a :class:`WheelSource`
that asks the host to fetch from a peer, through :meth:`Shipment.send` and
:meth:`Shipment.receive`, with its host-side handler among
:attr:`Wheelhouses.extra_sources`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import posixpath
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol

from .agent import BOOTSTRAP, agent_argv
from .errors import HostError, SpecClusterError
from .tasks import TaskSet

if TYPE_CHECKING:
    from .connection import Channel, ConnectSettings, HostConnection
    from .environments import EnvRequest, EnvTarget, WheelFile, Wheelhouse
    from .inventory import HostSpec

logger = logging.getLogger(__name__)

ENV_SCRIPT = "envbuild.py"
MIN_PYTHON = (3, 10)
CHUNK = 1 << 18
GC_DAYS = 30.0

#: ``progress(host, label)``: ``checking environment``, ``shipping 12.3 MB``, ``building``, ``environment ready``...
Progress = Callable[[str, str], None]


def env_lock_of(python: str) -> str:
    """The lock file of the environment whose python is ``python`` (``<env>/bin/python`` -> ``<env>.lock``)."""
    return posixpath.dirname(posixpath.dirname(python)) + ".lock"


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


class WheelSource(Protocol):
    """Gets wheels onto one host (see :attr:`Wheelhouses.source_for`)."""

    async def deliver(self, shipment: Shipment, wheels: Sequence[WheelFile]) -> None:
        """Bring ``wheels`` into the host's wheel store; return once every one is there, else raise.

        A source owns the channel until it returns: it sends requests
        (:meth:`Shipment.send`, :meth:`Shipment.send_wheel`) and reads the
        host script's answers (:meth:`Shipment.receive`), such as ``got`` and
        ``bad_wheel`` for a wheel frame, or those of an op a shipped source
        of its own adds (a fetch from a peer). It may hand what a peer could
        not deliver to :class:`FromHead`.
        """


class FromHead:
    """The default source: every wheel from the head, as frames over the host's channel."""

    async def deliver(self, shipment: Shipment, wheels: Sequence[WheelFile]) -> None:
        # The host answers each wheel; read while sending, so its answers never back up.
        answers = asyncio.ensure_future(_wheel_answers(shipment, len(wheels)))
        try:
            for wheel in wheels:
                await shipment.send_wheel(wheel)
            bad = await answers
        finally:
            if not answers.done():
                answers.cancel()
                await asyncio.gather(answers, return_exceptions=True)
        if bad:
            wheel = next((w for w in wheels if w.sha256 == bad.get("sha256")), None)
            where = str(wheel.path) if wheel is not None else "the head's wheel cache"
            raise HostError(
                shipment.host, f"a broken wheel: {bad.get('filename')}: {bad.get('why')}",
                fix=f"remove {where} from the head's wheel cache (it is gathered again at the next start)",
            )


@dataclass
class EnvStats:
    """What the environments of one cluster cost: bytes shipped and builds, per host."""

    shipped: dict[str, int] = field(default_factory=dict)
    built: dict[str, int] = field(default_factory=dict)
    ready: dict[str, str] = field(default_factory=dict)  # host -> the env's python, as last ensured

    @property
    def bytes_shipped(self) -> int:
        return sum(self.shipped.values())

    @property
    def builds(self) -> int:
        return sum(self.built.values())


class Wheelhouses:
    """The wheelhouses of one cluster: one per fingerprint, gathered once, in a thread, shared by its hosts.

    The pins are resolved again at every :meth:`get` (cheap: the head's
    installed metadata), so a start after the head's packages changed (a
    rolling ``restart``) gets the new fingerprint.

    Parameters
    ----------
    cache_dir
        The head's wheel cache (the builder's default when ``None``).
    builder
        ``builder(request, target, cache_dir) -> Wheelhouse`` (blocking); default
        :func:`speccluster_ssh.environments.build_wheelhouse`.
    fingerprint_of
        ``fingerprint_of(request, target) -> str`` (blocking, cheap); default: the
        fingerprint of :func:`~speccluster_ssh.environments.resolve_pins`.
    """

    def __init__(
        self,
        cache_dir: str | None = None,
        *,
        builder: Callable[[EnvRequest, EnvTarget, Any], Wheelhouse] | None = None,
        fingerprint_of: Callable[[EnvRequest, EnvTarget], str] | None = None,
    ) -> None:
        self.cache_dir = cache_dir
        self._builder = builder
        self._fingerprint_of = fingerprint_of
        self._houses: dict[str, asyncio.Task[Wheelhouse]] = {}
        self.tasks = TaskSet("the cluster's wheelhouses", logger)
        self.stats = EnvStats()
        #: Where host ``name`` gets its wheels: swap it for a fan-out (``source_for(name, wheelhouse)``).
        self.source_for: Callable[[str, Wheelhouse], WheelSource] = lambda name, wheelhouse: FromHead()
        #: Called once a host holds every wheel of a wheelhouse (a fan-out learns its servers here).
        self.on_delivered: Callable[[str, Wheelhouse], None] = lambda name, wheelhouse: None
        #: More ``agent/`` sources run before ``envbuild.py``'s main, in its namespace (they may add to its OPS).
        self.extra_sources: tuple[str, ...] = ()
        #: ``hold(name, shipment, fingerprint)`` after a host's ``ready``: True when it keeps the host script
        #: running (a fan-out's peer that serves the others), and ends it itself later.
        self.hold: Callable[[str, Shipment, str], bool] = lambda name, shipment, fingerprint: False

    def _fingerprint(self, request: EnvRequest, target: EnvTarget) -> str:
        if self._fingerprint_of is not None:
            return self._fingerprint_of(request, target)
        from .environments import fingerprint, resolve_pins

        return fingerprint(resolve_pins(request, target), target)

    def _build(self, request: EnvRequest, target: EnvTarget) -> Wheelhouse:
        if self._builder is not None:
            return self._builder(request, target, self.cache_dir)
        from pathlib import Path

        from .environments import build_wheelhouse

        return build_wheelhouse(request, target, Path(self.cache_dir) if self.cache_dir else None)

    async def get(self, request: EnvRequest, target: EnvTarget) -> Wheelhouse:
        """The wheelhouse for ``request`` on ``target``: gathered by the first caller, awaited by the others.

        A failed gathering is not kept: the next start tries again.
        """
        key = await asyncio.to_thread(self._fingerprint, request, target)
        house = self._houses.get(key)
        if house is None or (house.done() and (house.cancelled() or house.exception() is not None)):
            # Shielded below: a cancelled start does not cancel the gathering the other hosts wait for.
            house = self.tasks.start(asyncio.to_thread(self._build, request, target),
                                     name=f"gather the wheels for {target.describe()}", log_failure=False)
            self._houses[key] = house
        return await asyncio.shield(house)

    async def close(self) -> None:
        """End the gatherings still running (their threads run on, but nothing waits for them)."""
        await self.tasks.close()


def env_sources(extra: Sequence[str] = ()) -> list[tuple[str, bytes]]:
    """The host script's sources: the extra ones, then ``envbuild.py`` whose main runs."""
    package = resources.files("speccluster_ssh.agent")
    # envbuild.py first: the extra sources may add to its OPS (and must not define main, which the bootstrap calls).
    return [(name, package.joinpath(name).read_bytes()) for name in (ENV_SCRIPT, *extra)]


def env_payload(config: dict[str, Any], extra: Sequence[str] = ()) -> bytes:
    """The bytes the agent's bootstrap reads: the config line, then the sources."""
    sources = env_sources(extra)
    parts = [json.dumps(config).encode() + b"\n", str(len(sources)).encode() + b"\n"]
    for name, source in sources:
        parts.append(f"{name} {len(source)}\n".encode() + source)
    return b"".join(parts)


class Shipment:
    """The head's end of one host's envbuild channel: messages, wheel frames, and the bytes sent."""

    def __init__(self, host: str, channel: Channel, progress: Progress | None, timeout: float) -> None:
        self.host = host
        self.channel = channel
        self.progress = progress
        self.timeout = timeout
        self.bytes_sent = 0
        self.to_ship = 0

    def say(self, label: str) -> None:
        if self.progress is not None:
            self.progress(self.host, label)

    def send(self, message: dict[str, Any]) -> None:
        """Write one request line to the host script."""
        self.channel.write(json.dumps(message).encode() + b"\n")

    async def drain(self) -> None:
        drain = getattr(self.channel, "drain", None)
        if drain is not None:
            await drain()

    async def receive(self, timeout: float | None = None) -> dict[str, Any]:
        """The host script's next event; ``progress`` events are shown, not returned."""
        while True:
            try:
                line = await asyncio.wait_for(self.channel.readline(), timeout or self.timeout)
            except (asyncio.TimeoutError, TimeoutError):
                raise HostError(self.host, f"the environment script did not answer within {timeout or self.timeout:g} s",
                                self.channel.stderr_tail()) from None
            if not line:
                raise HostError(self.host, "the environment script ended early", self.channel.stderr_tail())
            try:
                message = json.loads(line)
            except ValueError:
                message = None
            if not isinstance(message, dict):
                raise HostError(self.host, f"the environment script said {line[:200]!r}", self.channel.stderr_tail())
            if message.get("event") == "progress":
                if message.get("phase") == "receiving":
                    continue  # a wheel still arriving: the label already says shipping
                step = message.get("step")
                self.say("waiting for another build" if message.get("phase") == "waiting"
                         else f"building ({step})" if step else str(message.get("phase")))  # fmt: skip
                continue
            return message

    async def send_wheel(self, wheel: WheelFile) -> None:
        """Send one wheel from the head's cache as a frame (header line, then its bytes), with flow control."""
        self.send({"op": "wheel", "sha256": wheel.sha256, "size": wheel.size, "filename": wheel.filename})
        sent = 0
        with open(wheel.path, "rb") as f:
            while sent < wheel.size:
                chunk = f.read(min(CHUNK, wheel.size - sent))
                if not chunk:
                    # The cache file shrank: pad, so the host reads a whole frame, finds the hash wrong and says so.
                    chunk = b"\0" * min(CHUNK, wheel.size - sent)
                self.channel.write(chunk)
                sent += len(chunk)
                self.bytes_sent += len(chunk)
                await self.drain()


async def ensure_environment(
    connection: HostConnection,
    host_spec: HostSpec,
    wheelhouses: Wheelhouses,
    *,
    progress: Progress | None = None,
    cluster_id: str = "",
    timeout: float = 60.0,
    build_timeout: float = 1800.0,
) -> str:
    """Make the head's environment ready on the host and return its python there.

    Parameters
    ----------
    connection
        The host's connection (opened here if needed).
    host_spec
        The host: its bare python, prologue, ``speccluster_packages``/``speccluster_requirements`` and env dir.
    wheelhouses
        The cluster's wheelhouses (and where the wheels come from, and what they cost).
    progress
        Called with ``(host, label)`` as the phases change.
    timeout
        Seconds for each answer of the host script, except the build's (``build_timeout``).

    Raises
    ------
    HostError
        With the fix: no usable python3 (3.10 or newer with venv), a broken wheel, a failed build.
    """
    from .environments import EnvRequest

    name = host_spec.name
    say = (lambda label: progress(name, label)) if progress is not None else (lambda label: None)
    say("checking environment")
    channel, shipment, target = await _open_script(connection, host_spec, cluster_id, timeout, progress,
                                                   wheelhouses.extra_sources)
    held = False
    try:
        try:
            wheelhouse = await wheelhouses.get(EnvRequest.from_host(host_spec), target)
        except SpecClusterError as exc:
            reason = getattr(exc, "reason", None) or str(exc)
            raise HostError(name, f"the head cannot gather the wheels for {target.describe()}: {reason}",
                            getattr(exc, "tail", ""), fix=getattr(exc, "fix", "")) from None  # fmt: skip
        shipment.send({"op": "need", **wheelhouse.manifest()})
        answer = await shipment.receive()
        if answer.get("event") == "missing":
            answer = await _ship_and_build(shipment, wheelhouses, wheelhouse, answer, build_timeout)
        if answer.get("event") == "failed" and answer.get("unwritable"):
            raise HostError(name, f"the environment directory: {answer.get('reason')}", fix=(
                f"make {answer['unwritable']} on {name} writable for {host_spec.user or 'the login user'}, "
                "or set speccluster_env_dir to a directory that is"))
        if answer.get("event") != "ready":
            raise HostError(name, f"the environment script said {answer}", channel.stderr_tail())
        wheelhouses.on_delivered(name, wheelhouse)
        python = str(answer["python"])
        if answer.get("built"):
            wheelhouses.stats.built[name] = wheelhouses.stats.built.get(name, 0) + 1
        wheelhouses.stats.ready[name] = python
        held = wheelhouses.hold(name, shipment, wheelhouse.fingerprint)
        if not held:
            shipment.send({"op": "bye", "keep": wheelhouse.fingerprint})
        say("environment ready")
        return python
    finally:
        if shipment.bytes_sent:
            wheelhouses.stats.shipped[name] = wheelhouses.stats.shipped.get(name, 0) + shipment.bytes_sent
        if not held:
            await channel.close()


async def _open_script(
    connection: HostConnection, host_spec: HostSpec, cluster_id: str, timeout: float, progress: Progress | None,
    extra_sources: Sequence[str] = (),
) -> tuple[Channel, Shipment, EnvTarget]:
    """Start the environment script on the host; its channel, the shipment over it, and the host's target."""
    await connection.open()
    config = {"env_dir": host_spec.env_dir, "gc_days": GC_DAYS}
    channel = await connection.open_channel(agent_argv(host_spec, cluster_id), host_spec.prologue)
    shipment = Shipment(host_spec.name, channel, progress, timeout)
    try:
        channel.write(env_payload(config, extra_sources))
        target = _usable_target(host_spec, await _first_event(shipment, host_spec))
    except BaseException:
        await channel.close()
        raise
    return channel, shipment, target


@dataclass(frozen=True)
class EnvState:
    """What ``check`` and ``plan`` say of a host's environment (see :func:`inspect_environment`).

    Attributes
    ----------
    state
        ``ready``, ``missing``, or ``another python`` (missing, and the host's python minor is not the head's).
    detail
        One line, e.g. ``missing (it will be built, 12.3 MB to ship)``.
    fingerprint
        The environment's fingerprint for this host.
    python
        The environment's python on the host (there once it is ready).
    to_ship
        Bytes the head would send (``None`` when its wheels are not gathered yet).
    """

    state: str
    detail: str
    fingerprint: str
    python: str
    to_ship: int | None = None


async def inspect_environment(
    connection: HostConnection, host_spec: HostSpec, *, cluster_id: str = "", timeout: float = 60.0,
    cache_dir: str | None = None,
) -> EnvState:
    """Look at the head's environment on the host: ready, or what it would take; ships and builds nothing.

    Raises
    ------
    HostError
        The host has no usable python3 (with the fix).
    """
    from pathlib import Path

    from .environments import EnvRequest, EnvTarget, cached_wheelhouse, fingerprint, resolve_pins
    from .envstate import describe_state

    channel, shipment, target = await _open_script(connection, host_spec, cluster_id, timeout, None)
    try:
        request = EnvRequest.from_host(host_spec)
        cache = Path(cache_dir) if cache_dir else None
        fp = await asyncio.to_thread(lambda: fingerprint(resolve_pins(request, target), target))
        house = await asyncio.to_thread(cached_wheelhouse, request, target, cache)
        wheels = house.manifest()["wheels"] if house is not None else []
        shipment.send({"op": "inspect", "fingerprint": fp, "wheels": wheels})
        found = await shipment.receive()
        shipment.send({"op": "bye", "collect": False})
    finally:
        await channel.close()
    if found.get("event") != "state":
        raise HostError(host_spec.name, f"the environment script said {found}")
    python = str(found.get("python") or "")
    if found.get("ready"):
        return EnvState("ready", "ready", fp, python, 0)
    have = set(found.get("have") or ())
    detail = describe_state(ready=False, wheelhouse=house, host_has=have, target=target)
    state = "another python" if target.python != EnvTarget.of_head().python else "missing"
    to_ship = sum(w.size for w in house.wheels if w.sha256 not in have) if house is not None else None
    return EnvState(state, detail, fp, python, to_ship)


async def survey_environments(
    hosts: Sequence[HostSpec], settings: ConnectSettings, timeout: float = 30.0
) -> dict[str, EnvState | str]:
    """:func:`inspect_environment` on every host of ``hosts`` at once: its state, or why it could not be asked."""
    from .connection import HostConnection

    async def ask(host: HostSpec) -> EnvState | str:
        connection = HostConnection(host, settings)
        try:
            return await asyncio.wait_for(inspect_environment(connection, host, timeout=timeout),
                                          timeout + float(host.connect_timeout) + 5)
        except HostError as exc:
            return exc.reason + (f"; fix: {exc.fix}" if exc.fix else "")
        except (asyncio.TimeoutError, TimeoutError):
            return f"no answer within {timeout:g} s"
        except OSError as exc:
            return str(exc.strerror or exc)
        finally:
            await connection.close()

    results = await asyncio.gather(*(ask(h) for h in hosts))
    return {h.name: r for h, r in zip(hosts, results)}


async def _first_event(shipment: Shipment, host: HostSpec) -> dict[str, Any]:
    try:
        facts = await shipment.receive()
    except HostError as exc:
        raise _no_python(host, exc.tail) from None
    if facts.get("event") != "target":
        raise HostError(host.name, f"the environment script said {facts}", shipment.channel.stderr_tail())
    return facts


def _no_python(host: HostSpec, stderr: str) -> HostError:
    last = stderr.strip().splitlines()[-1] if stderr.strip() else "no output"
    return HostError(
        host.name,
        f"cannot run the environment script with {host.python}: {last}",
        stderr,
        fix=f"install python3 (3.10 or newer, with its venv module) on {host.name}, "
        "or set speccluster_python to one",
    )


def _usable_target(host: HostSpec, facts: dict[str, Any]) -> EnvTarget:
    """The host's target, if its python can build environments; else the :class:`HostError` with the fix."""
    from .environments import EnvTarget

    version = str(facts.get("python") or "0.0")
    try:
        major_minor = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        major_minor = (0, 0)
    where = facts.get("executable") or host.python
    if major_minor < MIN_PYTHON:
        raise HostError(
            host.name, f"{where} is python {facts.get('version') or version}; environments need 3.10 or newer",
            fix=f"install python3 (3.10 or newer, with its venv module) on {host.name} and set speccluster_python to it",
        )
    if not facts.get("venv") or not facts.get("ensurepip"):
        raise HostError(
            host.name, f"{where} cannot make virtual environments (its venv or ensurepip module is missing)",
            fix=f"install the venv module for {where} on {host.name} (Debian/Ubuntu: apt install python3-venv), "
            "or set speccluster_python to a python3 that has it",
        )
    return EnvTarget.parse(version, str(facts.get("machine") or ""), str(facts.get("libc") or ""))


async def _ship_and_build(
    shipment: Shipment, wheelhouses: Wheelhouses, wheelhouse: Wheelhouse, missing: dict[str, Any], build_timeout: float
) -> dict[str, Any]:
    """Deliver the wheels the host lacks, then have it build; returns its ``ready`` (or raises)."""
    name = shipment.host
    lacking = set(missing.get("wheels") or ())
    wheels = [w for w in wheelhouse.wheels if w.sha256 in lacking]
    if wheels:
        shipment.to_ship = sum(w.size for w in wheels)
        shipment.say(f"shipping {_megabytes(shipment.to_ship)}")
        await wheelhouses.source_for(name, wheelhouse).deliver(shipment, wheels)
    shipment.say("building")
    shipment.send({"op": "build"})
    answer = await shipment.receive(build_timeout)
    if answer.get("event") == "failed":
        tail = str(answer.get("tail") or "")
        raise HostError(
            name, f"building the environment {wheelhouse.fingerprint[:12]} failed: {answer.get('reason')}", tail,
            fix=_build_fix(tail, wheelhouse),
        )
    return answer


async def _wheel_answers(shipment: Shipment, count: int) -> dict[str, Any] | None:
    """Read the host's answer to each of ``count`` wheels; the first ``bad_wheel``, else None."""
    bad = None
    for _ in range(count):
        answer = await shipment.receive()
        if answer.get("event") == "bad_wheel":
            bad = bad or answer
        elif answer.get("event") != "got":
            raise HostError(shipment.host, f"the environment script said {answer}", shipment.channel.stderr_tail())
    return bad


def _build_fix(tail: str, wheelhouse: Wheelhouse) -> str:
    if "No space left" in tail:
        return "free disk space in the host's environment directory, or set speccluster_env_dir elsewhere"
    if "BadZipFile" in tail or "is not a valid wheel" in tail or "zip file" in tail.lower():
        return "a wheel in the head's cache is damaged: remove it (it is gathered again at the next start)"
    return ("check speccluster_packages / speccluster_requirements against the log above; "
            f"the wheels are in the head's cache ({os.path.commonpath([str(w.path) for w in wheelhouse.wheels]) if wheelhouse.wheels else '?'})")  # fmt: skip

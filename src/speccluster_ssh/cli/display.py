"""How the command line shows things: tables, the start-up progress view,
a running cluster's status and connection details, and the new part of a
log for ``logs --follow``. Nothing here asks a cluster anything.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .. import state as st
from ..messages import PROG

if TYPE_CHECKING:
    from rich.console import Console, RenderableType


def workers_text(count: Any) -> str:
    """``1 worker``, ``3 workers``."""
    return f"{count} worker" if count == 1 else f"{count} workers"


def _console(stderr: bool = False) -> Console:
    from rich.console import Console

    probe = Console(stderr=stderr)
    if probe.is_terminal or os.environ.get("COLUMNS"):
        return probe
    # Pipes and test runners get 80 columns by default, which mangles tables.
    return Console(stderr=stderr, width=160)


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _error_line(message: str) -> None:
    click.echo(f"{PROG}: error: {message}", err=True)


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> RenderableType:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, title_justify="left", show_lines=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        # Text cells: inventory values such as "node[01]" must not be read as markup.
        table.add_row(*(Text("" if v is None else str(v)) for v in row))
    return table


def _bytes(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        from dask.utils import format_bytes

        return format_bytes(int(value))
    return "" if value in (None, 0) else str(value)


class ProgressView:
    """Shows hosts connecting and workers registering.

    On a terminal a live table is redrawn; elsewhere (CI, pipes) one line
    is printed whenever a host changes state, with its count and elapsed time.
    """

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live: Any = None
        self.last: dict[str, tuple[str, int, int, str]] = {}

    def update(self, progress: Mapping[str, Any]) -> None:
        rows = progress.get("hosts", [])
        if self.console.is_terminal:
            if self.live is None:
                from rich.live import Live

                self.live = Live(console=self.console, auto_refresh=False, transient=False)
                self.live.start()
            self.live.update(self.render(progress), refresh=True)
            return
        from rich.text import Text

        for row in rows:
            key = (row["label"], row["ready"], row["wanted"], row["reason"])
            if self.last.get(row["host"]) != key:
                self.last[row["host"]] = key
                self.console.print(Text(self._line(row)), soft_wrap=True)

    @staticmethod
    def _line(row: Mapping[str, Any]) -> str:
        what = "scheduler" if row["role"] == "scheduler" else "workers"
        line = f"{row['host']}: {row['label']}, {row['ready']}/{row['wanted']} {what} ({row['seconds']:.1f} s)"
        return line + (f" - {row['reason']}" if row.get("reason") else "")

    @staticmethod
    def render(progress: Mapping[str, Any]) -> RenderableType:
        """A table of the hosts in ``progress``."""
        rows = [
            (r["host"], r["role"], r["label"], f"{r['ready']}/{r['wanted']}", f"{r['seconds']:.1f} s", r["reason"])
            for r in progress.get("hosts", [])
        ]
        title = f"cluster {progress.get('name')}: {progress.get('phase')} ({progress.get('seconds', 0):.1f} s)"
        return _table(("host", "role", "state", "ready", "elapsed", "reason"), rows, title=title)

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


def _reach_line(reach: Mapping[str, Any]) -> str:
    """``forward, scheduler on h1: why`` from a ``scheduler_reach`` report."""
    where = reach.get("scheduler_host") or "the head"
    return f"{reach.get('mode')}, scheduler on {where}: {reach.get('why')}"


def _print_connect_info(state: st.ClusterState, directory: Path, *, detached: bool) -> None:
    lines = [
        f"cluster {state.name} is running (head pid {state.pid})",
        f"  scheduler: {state.scheduler_address}",
        f"  dashboard: {state.dashboard_link or '(none)'}",
    ]
    if state.scheduler_reach:
        lines.append(f"  reach:     {_reach_line(state.scheduler_reach)}")
    if state.client_config:
        lines.append(f"  connect:   DASK_CONFIG={state.client_config} python -c 'from distributed import Client; Client()'")
        lines.append(f"             or paste the output of: {PROG} client-config --name {state.name}")
    if not state.tls:
        lines.append("  TLS is off: anyone who can reach the scheduler can run code as you")
    if detached:
        lines.append(f"  stop:      {PROG} down --name {state.name}")
    else:
        lines.append("  stop:      press Ctrl-C")
    if state.summary:
        from ..reporting import summary_line

        lines.append(summary_line(state.summary))
    for line in lines:
        click.echo(line)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join("    " + line for line in text.strip().splitlines()[-lines:])


def _render_status(report: Mapping[str, Any]) -> None:
    console = _console()
    if report.get("phase") != "running":
        console.print(ProgressView.render(report.get("progress") or report))
        return
    adaptive = report.get("adaptive")
    scaling = f"adaptive {adaptive['minimum']}..{adaptive['maximum']}" if adaptive else "manual scaling"
    lines = [
        f"cluster {report.get('name')}: running (head pid {report.get('pid')}, since {report.get('started')}, {scaling})",
        f"  scheduler: {report.get('scheduler_address')}",
        f"  dashboard: {report.get('dashboard_link') or '(none)'}",
    ]
    reach = report.get("scheduler_reach")
    if reach:
        lines.append(f"  reach:     {_reach_line(reach)}")
    for line in lines:
        click.echo(line)
    hosts = report.get("hosts", {})
    power = any(v.get("power_label") for v in hosts.values())  # a column only where hosts sleep
    console.print(_table(
        ("host", "address", "state", *(("power",) if power else ()), "slots used", "reason"),
        [(h, v.get("address"), f"{v.get('state')}, drained" if v.get("drained") else v.get("state"),
          *((v.get("power_label") or "-",) if power else ()),
          f"{v.get('slots_used')}/{v.get('slots')}",
          "; ".join(filter(None, (f"drained: {v['drained']}" if v.get("drained") else "", v.get("reason") or "")))
          + (f"; fix: {v['fix']}" if v.get("fix") else ""))
         for h, v in hosts.items()],
        title="hosts",
    ))
    others = {h: v for h, v in hosts.items() if v.get("holders") or v.get("wants")}
    if others:
        from ..labview import holders_line

        click.echo("other clusters on these hosts:")
        for host, data in others.items():
            click.echo(f"  {host}: {holders_line(data)}")
    if report.get("summary"):
        from ..reporting import summary_line

        click.echo(summary_line(report["summary"]))
    workers = report.get("workers", [])
    gpus = any(w.get("gpus") is not None for w in workers)  # a column only where hosts have GPUs
    console.print(_table(
        ("name", "host", "address", "status", "threads", "memory", *(("gpus",) if gpus else ())),
        [(w.get("name"), w.get("host"), w.get("address"), w.get("status"), w.get("threads"),
          _bytes(w.get("memory_limit")), *((",".join(w.get("gpus") or []) or "-",) if gpus else ()))
         for w in workers],
        title=_workers_title(workers),
    ))
    if report.get("capacity_note"):
        click.echo(f"note: {report['capacity_note']}")


def _workers_title(workers: Sequence[Mapping[str, Any]]) -> str:
    """``3 workers running, 1 pending``: entries not yet registered are not counted as workers."""
    running = sum(1 for w in workers if w.get("status") == "running")
    pending = len(workers) - running
    return f"{workers_text(running)} running" + (f", {pending} pending" if pending else "")


def _new_text(old: str, new: str) -> str:
    """What ``new`` adds after ``old``.

    Log tails are windows of bounded size: when the window slides, ``new``
    is an end part of ``old`` followed by the added text. Of the possible
    overlaps the longest is taken, so repeated lines are not printed twice.
    """
    if not old:
        return new
    if new.startswith(old):
        return new[len(old):]
    anchor = old[-256:]
    best = -1
    start = new.find(anchor)
    while start >= 0:
        end = start + len(anchor)
        if old.endswith(new[:end]):
            best = end
        start = new.find(anchor, start + 1)
    return new[best:] if best >= 0 else new

"""The README's dask-labextension configuration starts a working cluster.

dask-labextension (the Dask panel of JupyterLab) makes its clusters from the
dask config ``labextension.factory``: it imports ``module``, takes ``class``
from it, turns dashes in the keys of ``kwargs`` into underscores and awaits
``cls(*args, **kwargs, asynchronous=True)``.  Then it scales (or adapts) the
cluster as the panel asks, reads the scheduler's ``identity()`` for the
panel's model, and awaits ``close()``.  The test does the same steps with the
configuration printed in the README (its inventory replaced by the packaged
local inventory, so no lab is needed), without depending on
dask-labextension, and checks what a notebook shows: ``repr()`` and
``_repr_html_()``.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import re
import time
from pathlib import Path
from typing import Any

import dask
import yaml

from speccluster_ssh.resources import local_inventory

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_labextension_config() -> dict[str, Any]:
    """The YAML block of the README that configures ``labextension``."""
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.S)
    found = [yaml.safe_load(block) for block in blocks if block.startswith("labextension:")]
    assert len(found) == 1, f"expected one ```yaml block starting with 'labextension:' in README.md, found {len(found)}"
    return found[0]


def test_readme_factory_names_the_cluster_class() -> None:
    factory = readme_labextension_config()["labextension"]["factory"]
    assert factory["module"] == "speccluster_ssh"
    assert factory["class"] == "SSHSpecCluster"
    assert factory["args"] == []
    assert "inventory" in factory["kwargs"]


async def _wait_for(predicate: Any, what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.1)


async def _make_cluster_like_the_extension() -> Any:
    # dask-labextension's manager.make_cluster, step by step.
    module = importlib.import_module(dask.config.get("labextension.factory.module"))
    cls = getattr(module, dask.config.get("labextension.factory.class"))
    kwargs = {key.replace("-", "_"): value for key, value in dask.config.get("labextension.factory.kwargs").items()}
    return await cls(*dask.config.get("labextension.factory.args"), **kwargs, asynchronous=True)


def test_labextension_factory_starts_scales_shows_and_closes() -> None:
    config = readme_labextension_config()
    config["labextension"]["factory"]["kwargs"]["inventory"] = str(local_inventory())

    async def main() -> None:
        from distributed import Client

        cluster = await _make_cluster_like_the_extension()
        pids: set[int] = set()
        try:
            assert type(cluster).__name__ == "SSHSpecCluster"

            async def workers_are(n: int) -> Any:
                # What the panel's cluster model counts.
                info = await cluster.scheduler_comm.identity()
                return len(info["workers"]) == n and info

            # The panel's worker count: down to none, then up to two (the local
            # inventory offers at least two workers).
            cluster.scale(0)
            await _wait_for(lambda: workers_are(0), "0 workers after scale(0)")
            cluster.scale(2)
            info = await _wait_for(lambda: workers_are(2), "2 workers after scale(2)")
            assert sum(w["nthreads"] for w in info["workers"].values()) >= 2

            async with Client(cluster, asynchronous=True) as client:
                assert await client.submit(sum, [1, 2, 3]) == 6
                pids = set((await client.run(os.getpid)).values())

            # What a notebook cell shows: the text repr and the HTML repr,
            # once the cluster's view of the scheduler has caught up.
            async def repr_shows_two() -> bool:
                return "workers=2" in repr(cluster)

            await _wait_for(repr_shows_two, "repr() to show workers=2")
            text = repr(cluster)
            assert text.startswith("SSHSpecCluster("), text
            assert cluster.scheduler_address in text
            html = cluster._repr_html_()
            assert "SSHSpecCluster" in html
            assert cluster.dashboard_link in html
            assert "<strong>Workers:</strong> 2" in html, html

            # The panel's adapt button.
            adaptive = cluster.adapt(minimum=0, maximum=2)
            assert (adaptive.minimum, adaptive.maximum) == (0, 2)
        finally:
            await cluster.close()
        assert cluster.status.name == "closed"
        for pid in pids:
            await _wait_gone(pid)

    with dask.config.set(config):
        asyncio.run(main())


async def _wait_gone(pid: int, timeout: float = 15.0) -> None:
    async def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    await _wait_for(gone, f"worker process {pid} to end after close()", timeout)

"""Stand-in worker classes for ``speccluster_worker_class`` (tests/test_worker_class.py).

The lab hosts import this module by path (``standin_workers.MarkedNanny``)
from a copy put on their ``PYTHONPATH`` through ``speccluster_env``. Each
class leaves a mark the tests read through the scheduler: the class itself
(``client.run`` with ``nanny=True`` for nannies) and an environment variable
of the worker process. :class:`StandInCUDAWorker` behaves as
``dask_cuda.CUDAWorker`` does where it matters here, with no GPU: it is
neither a Nanny nor a Worker, starts one nanny per device of
``CUDA_VISIBLE_DEVICES`` and takes ``resources`` as text (``GPU=1,FPGA=1``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Generator
from typing import Any

from distributed import Nanny, Worker

MARK = "STANDIN_WORKER_CLASS"

# Some modules talk as they are imported; the agent's replies to the head must not carry it.
print("standin_workers imported")


class MarkedNanny(Nanny):
    """A nanny whose worker process has ``STANDIN_WORKER_CLASS=MarkedNanny`` in its environment."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["env"] = {**(kwargs.get("env") or {}), MARK: "MarkedNanny"}
        super().__init__(*args, **kwargs)


class MarkedWorker(Worker):
    """A bare worker that sets ``STANDIN_WORKER_CLASS=MarkedWorker``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        os.environ[MARK] = "MarkedWorker"
        super().__init__(*args, **kwargs)


class StandInCUDAWorker:
    """Like ``dask_cuda.CUDAWorker``: one nanny per visible device, text resources, no Nanny or Worker base."""

    def __init__(self, scheduler: str, *, name: Any = None, resources: str | None = None, **kwargs: Any) -> None:
        if resources is not None and not isinstance(resources, str):
            raise TypeError(f"resources must be text such as 'GPU=1', got {resources!r}")  # as CUDAWorker fails
        parsed = dict(pair.split("=") for pair in (resources or "").replace(",", " ").split())
        devices = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",") if d]
        self.nannies = [
            Nanny(
                scheduler,
                name=name if len(devices) == 1 else f"{name}-{i}",
                resources={k: float(v) for k, v in parsed.items()} or None,
                env={"CUDA_VISIBLE_DEVICES": device, MARK: "StandInCUDAWorker"},
                **kwargs,
            )
            for i, device in enumerate(devices)
        ]

    def __await__(self) -> Generator[Any, None, StandInCUDAWorker]:
        return self._start().__await__()

    async def _start(self) -> StandInCUDAWorker:
        await asyncio.gather(*self.nannies)
        return self

    async def finished(self) -> None:
        await asyncio.gather(*(n.finished() for n in self.nannies))

    async def close(self, timeout: float = 5) -> None:
        await asyncio.gather(*(n.close(timeout=timeout) for n in self.nannies))


def not_a_class() -> None:
    """Named by a test as speccluster_worker_class: a function, which the host refuses."""

"""The long-lived stage driver. Kept free of heavy imports: the Ray Client server that
unpickles this class for every new client session then starts in milliseconds, not seconds."""

from __future__ import annotations

import os
from typing import Any

import ray


@ray.remote(num_cpus=0, max_concurrency=16)
class StageExecutor:
    """A detached stage driver, one per cluster, namespace and runtime_env; stages run in its threads.

    Every Ray Client session is a new Ray job with its own worker processes; a stage run as a
    plain task starts its driver process and imports Ray Data, pandas and pyarrow afresh.
    The executor keeps one warm driver process for all stages.
    """

    def __init__(self) -> None:
        self.cancelled: set[str] = set()

    def run(self, spec: dict[str, Any]) -> dict[str, Any]:
        from .runner import run_stage

        stage_id = spec.get("stage_id", "")
        try:
            return run_stage(spec, cancelled=lambda: stage_id in self.cancelled)
        finally:
            self.cancelled.discard(stage_id)

    def cancel(self, stage_id: str) -> None:
        self.cancelled.add(stage_id)

    def pid(self) -> int:
        return os.getpid()

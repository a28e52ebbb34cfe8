"""The long-lived stage driver. Kept free of heavy imports: the Ray Client server that
unpickles this class for every new client session then starts in milliseconds, not seconds."""

from __future__ import annotations

import os
import threading
from typing import Any

import ray

# How long a cancel waits for the stage's process to be gone.
CANCEL_WAIT_SECONDS = 30


@ray.remote(num_cpus=0, max_retries=0)
def run_stage_task(spec: dict[str, Any]) -> dict[str, Any]:
    """One stage in its own worker process: a cancel kills the process, Ray Data's tasks with it."""
    from .runner import run_stage

    return run_stage(spec)


@ray.remote(num_cpus=0, max_concurrency=16)
class StageExecutor:
    """A detached stage driver, one per cluster, namespace and runtime_env.

    Every Ray Client session is a new Ray job with its own worker processes; a stage run as a
    plain task of that job starts its worker and imports Ray Data, pandas and pyarrow afresh.
    Stages started from here belong to the executor's long-lived job and reuse warm workers.

    Each stage runs as a task (``run_stage_task``) so it can be stopped for real: a threaded
    actor's own method cannot be interrupted by ``ray.cancel``, a task can be force-cancelled.
    A newer try of the same Airflow task (same DAG, run and task id) supersedes an older one
    that is still running (its Airflow process may have died with the Ray Client connection),
    so two tries of a task never write at the same time.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: dict[str, tuple[tuple, ray.ObjectRef]] = {}  # stage_id -> (task identity, ref)

    def run(self, spec: dict[str, Any]) -> dict[str, Any]:
        stage_id = spec["stage_id"]
        identity = _identity(spec)
        with self.lock:
            older = [sid for sid, (ident, _) in self.running.items() if identity and ident == identity]
        for sid in older:
            self.cancel(sid)
        ref = run_stage_task.options(name=spec.get("name") or "raydata-stage").remote(spec)
        with self.lock:
            self.running[stage_id] = (identity, ref)
        try:
            return ray.get(ref)
        finally:
            with self.lock:
                self.running.pop(stage_id, None)

    def cancel(self, stage_id: str) -> bool:
        """Kill the stage's process and wait until it is gone. False if it was not running."""
        with self.lock:
            entry = self.running.get(stage_id)
        if entry is None:
            return False
        ref = entry[1]
        ray.cancel(ref, force=True)
        ray.wait([ref], timeout=CANCEL_WAIT_SECONDS)
        return True

    def running_stages(self) -> list[str]:
        with self.lock:
            return list(self.running)

    def pid(self) -> int:
        return os.getpid()


def _identity(spec: dict[str, Any]) -> tuple:
    produced_by = spec.get("produced_by") or {}
    return tuple(produced_by.get(key) for key in ("dag_id", "run_id", "task_id")) if produced_by else ()

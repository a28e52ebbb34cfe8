"""The long-lived stage driver. Kept free of heavy imports: the Ray Client server that
unpickles this class for every new client session then starts in milliseconds, not seconds."""

from __future__ import annotations

import os
import threading
from typing import Any

import ray


@ray.remote(num_cpus=0, max_restarts=0)
class StageProcess:
    """One stage in its own worker process, started ahead of time so the stage finds Ray Data,
    pandas and pyarrow already imported. Killing it (a cancel) stops the stage, Ray Data's tasks
    with it: a running method of a threaded actor, by contrast, cannot be interrupted."""

    def __init__(self) -> None:
        from . import runner  # noqa: F401 - imports Ray Data, pandas and pyarrow now, not in the stage

    def run(self, spec: dict[str, Any]) -> dict[str, Any]:
        from .runner import run_stage

        return run_stage(spec)


@ray.remote(num_cpus=0, max_concurrency=16)
class StageExecutor:
    """A detached stage driver, one per cluster, namespace and runtime_env.

    Every Ray Client session is a new Ray job, and Ray starts and stops worker processes per
    job; the executor belongs to a long-lived job. It runs each stage in a ``StageProcess`` and
    keeps the processes of finished stages for the next ones (warm: measured here, a worker
    started per stage cost about 2 s more per stage); a cancelled or failed stage's process is
    ended, never reused. A newer try of the same Airflow task (same DAG, run and task id) supersedes an
    older one that is still running (its Airflow process may have died with the Ray Client
    connection), so two tries of a task never write at the same time.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: dict[str, tuple[tuple, Any, ray.ObjectRef]] = {}  # stage_id -> (identity, process, ref)
        self.idle: list[Any] = []  # warm StageProcesses

    def run(self, spec: dict[str, Any]) -> dict[str, Any]:
        stage_id, identity = spec["stage_id"], _identity(spec)
        with self.lock:
            older = [sid for sid, entry in self.running.items() if identity and entry[0] == identity]
            process = self.idle.pop() if self.idle else StageProcess.remote()
        for sid in older:
            self.cancel(sid)
        ref = process.run.options(name=spec.get("name") or "raydata-stage").remote(spec)
        with self.lock:
            self.running[stage_id] = (identity, process, ref)
        reusable = False
        try:
            result = ray.get(ref)
            reusable = True
            return result
        finally:
            with self.lock:
                cancelled = self.running.pop(stage_id, None) is None
                if reusable and not cancelled:
                    self.idle.append(process)
            if not reusable:
                ray.kill(process)

    def cancel(self, stage_id: str) -> bool:
        """Stop a running stage: cancel its Ray task and end its process. False if it was not running."""
        with self.lock:
            entry = self.running.pop(stage_id, None)
        if entry is None:
            return False
        _, process, ref = entry
        ray.cancel(ref)  # a queued task never starts; a running one ends with its process:
        ray.kill(process, no_restart=True)
        ray.wait([ref], timeout=30)
        return True

    def pid(self) -> int:
        return os.getpid()


def _identity(spec: dict[str, Any]) -> tuple:
    produced_by = spec.get("produced_by") or {}
    return tuple(produced_by.get(key) for key in ("dag_id", "run_id", "task_id")) if produced_by else ()

"""The long-lived stage driver (on the cluster). Kept free of heavy imports: the Ray Client server that
unpickles this class for every new client session then starts in milliseconds, not seconds."""

from __future__ import annotations

import os
import re
import threading
import time
from collections import OrderedDict
from typing import Any

import ray

from ..contracts import StageResult, StageSpec

# How long a load published in an open transaction waits for its Airflow task to commit it; then
# its process is ended and PostgreSQL rolls it back (the task died or lost the cluster).
COMMIT_WAIT_SECONDS = 120
KEPT_LOGS = 256  # stages whose log lines the executor keeps for their readers
LOG_FLUSH_SECONDS = 0.5
DATASET_STARTED = re.compile(r"Starting execution of Dataset (\w+)")  # Ray Data's line, with its id


@ray.remote(num_cpus=0, max_restarts=0)
class StageProcess:
    """One stage at a time in its own worker process, started ahead of time so the stage finds
    Ray Data, pandas and pyarrow already imported. Killing it (a cancel) stops the stage, Ray
    Data's tasks with it: a running method of a threaded actor, by contrast, cannot be interrupted.
    Its log lines go to the executor every ``LOG_FLUSH_SECONDS`` from a thread of its own (an
    actor method to read them would rename the process in the dashboard while the stage runs)."""

    def __init__(self, executor: Any) -> None:
        from . import counters, runner  # noqa: F401 - imports Ray Data, pandas and pyarrow now, not in the stage
        from .stage_log import install

        self.executor = executor
        self.stage_log = install()
        counters.install()
        self.flush_lock = threading.Lock()
        self.pushed: list[ray.ObjectRef] = []  # add_lines calls not yet known done
        threading.Thread(target=self._flush_forever, name="raydata-stage-log", daemon=True).start()

    def run(self, spec: StageSpec) -> StageResult:
        from . import counters, stage_log
        from .errors import root_cause
        from .runner import run_stage
        from .stage_log import log

        counters.reset()
        self.stage_log.start(spec.stage_id)
        stage_log.forward_prints_to = (spec.stage_id, self.executor)
        log.info("%s stage %s started in process %d", spec.stage, spec.name, os.getpid())
        try:
            result = run_stage(spec)
            log.info("%s stage %s finished in %.2fs", spec.stage, spec.name, result.metrics.seconds)
            return result
        except BaseException as exc:
            log.error("%s stage %s failed: %s", spec.stage, spec.name, root_cause(exc))
            raise
        finally:
            self._flush()
            with self.flush_lock:  # every line is with the executor before the result is
                pushed, self.pushed = self.pushed, []
            ray.get(pushed)

    def commit_held_load(self, stage_id: str, commit: bool) -> None:
        from .runner import commit_held_load

        commit_held_load(stage_id, commit)

    def _flush(self) -> None:
        from .counters import take_if_changed

        with self.flush_lock:
            stage_id, start, lines = self.stage_log.take()
            if lines:
                self.pushed.append(self.executor.add_lines.remote(stage_id, start, lines))
            counts = take_if_changed()
            if counts and stage_id:
                self.pushed.append(self.executor.set_counts.remote(stage_id, counts))

    def _flush_forever(self) -> None:
        while True:
            time.sleep(LOG_FLUSH_SECONDS)
            try:
                self._flush()
            except Exception:  # noqa: BLE001 - the executor is going away: so is this process
                pass


# commit and cancel have threads of their own: 16 long-running stages must not hold them up.
@ray.remote(num_cpus=0, max_concurrency=16, concurrency_groups={"control": 4})
class StageExecutor:
    """A detached stage driver, one per cluster, namespace and runtime_env.

    Every Ray Client session is a new Ray job, and Ray starts and stops worker processes per
    job; the executor belongs to a long-lived job. It runs each stage in a ``StageProcess`` and
    keeps the processes of finished stages for the next ones (warm: measured here, a worker
    started per stage cost about 2 s more per stage); a cancelled or failed stage's process is
    ended, never reused. A newer try of the same Airflow task (same DAG, run and task id) supersedes an
    older one that is still running (its Airflow process may have died with the Ray Client
    connection), so two tries of a task never write at the same time.

    A load stage may end with its rows published in a transaction left open: its process is then
    held, not reused, until the task calls ``commit`` (or ``cancel``), at most
    ``COMMIT_WAIT_SECONDS``.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: dict[str, tuple[tuple, Any, ray.ObjectRef]] = {}  # stage_id -> (identity, process, ref)
        self.idle: list[Any] = []  # warm StageProcesses
        # stage_id -> (identity, process, timer): a load awaiting its task's commit
        self.held: dict[str, tuple[tuple, Any, threading.Timer]] = {}
        self.stage_lines: OrderedDict[str, Any] = OrderedDict()  # stage_id -> its stage_log.StageLines
        self.pages: OrderedDict[str, str] = OrderedDict()  # stage_id -> its task's page in the dashboard
        self.datasets: OrderedDict[str, list[str]] = OrderedDict()  # stage_id -> its Ray Data datasets
        self.counts: OrderedDict[str, dict[str, list[dict]]] = OrderedDict()  # stage_id -> runtime.counters

    def run(self, spec: StageSpec) -> StageResult:
        stage_id, identity = spec.stage_id, spec.produced_by.task
        with self.lock:
            entries = [*self.running.items(), *self.held.items()]
            older = [sid for sid, entry in entries if any(identity) and entry[0] == identity]
            process = self.idle.pop() if self.idle else StageProcess.remote(ray.get_runtime_context().current_actor)
        for sid in older:
            self.cancel(sid)
        ref = process.run.options(name=spec.name or "raydata-stage").remote(spec)
        job_id = ray.get_runtime_context().get_job_id()
        with self.lock:
            self.running[stage_id] = (identity, process, ref)
            self.pages[stage_id] = f"#/jobs/{job_id}/tasks/{ref.task_id().hex()}"
        result: StageResult | None = None
        try:
            result = ray.get(ref)
            return result
        finally:
            with self.lock:
                cancelled = self.running.pop(stage_id, None) is None
                if result is not None and not cancelled:
                    if result.held:
                        timer = threading.Timer(COMMIT_WAIT_SECONDS, self.cancel, [stage_id])
                        timer.daemon = True
                        self.held[stage_id] = (identity, process, timer)
                        timer.start()
                    else:
                        self.idle.append(process)
            if result is None:
                ray.kill(process)

    @ray.method(concurrency_group="control")
    def commit(self, stage_id: str, commit: bool = True) -> bool:
        """Commit (or roll back) a load stage's open transaction. False if it is no longer held
        (it waited too long, or a newer try of its task replaced it): then nothing was published."""
        with self.lock:
            entry = self.held.pop(stage_id, None)
        if entry is None:
            return False
        _, process, timer = entry
        timer.cancel()
        try:
            ray.get(process.commit_held_load.remote(stage_id, commit))
        except BaseException:
            ray.kill(process)
            raise
        with self.lock:
            self.idle.append(process)
        return True

    @ray.method(concurrency_group="control")
    def cancel(self, stage_id: str) -> bool:
        """Stop a running stage (cancel its Ray task and end its process) or roll back a held one.
        False if it was neither."""
        with self.lock:
            entry = self.running.pop(stage_id, None)
            held = self.held.pop(stage_id, None)
        if held is not None:  # its open transaction ends with the process: PostgreSQL rolls it back
            held[2].cancel()
            ray.kill(held[1], no_restart=True)
            return True
        if entry is None:
            return False
        _, process, ref = entry
        ray.cancel(ref)  # a queued task never starts; a running one ends with its process:
        ray.kill(process, no_restart=True)
        ray.wait([ref], timeout=30)
        return True

    @ray.method(concurrency_group="control")
    def add_lines(self, stage_id: str, start: int, lines: list[dict[str, Any]]) -> None:
        """A batch of the stage process's own lines, at its offset in that process's numbering."""
        started = [m.group(1) for line in lines if (m := DATASET_STARTED.search(str(line.get("message", ""))))]
        with self.lock:
            self._lines(stage_id).add_own(start, lines)
            if started:
                known = self.datasets.setdefault(stage_id, [])
                known += [tag for tag in started if tag not in known]

    @ray.method(concurrency_group="control")
    def add_prints(self, stage_id: str, lines: list[dict[str, Any]]) -> None:
        """What the stage's user function printed in one of its map tasks."""
        with self.lock:
            self._lines(stage_id).add_prints(lines)

    @ray.method(concurrency_group="control")
    def set_counts(self, stage_id: str, counts: dict[str, list[dict[str, Any]]]) -> None:
        """Rows and bytes so far of each operator of the stage's datasets (``runtime.counters``)."""
        with self.lock:
            self._lines(stage_id)  # the stage's entry, and room for it
            self.counts[stage_id] = counts

    def _lines(self, stage_id: str) -> Any:
        from .stage_log import StageLines

        if stage_id not in self.stage_lines:
            self.stage_lines[stage_id] = StageLines()
            for kept_by_stage in (self.stage_lines, self.datasets, self.pages, self.counts):  # every stage logs
                while len(kept_by_stage) > KEPT_LOGS:
                    kept_by_stage.popitem(last=False)
        return self.stage_lines[stage_id]

    @ray.method(concurrency_group="control")
    def progress(self, stage_id: str) -> dict[str, Any]:
        """How far the stage got: the rows and bytes (in memory) its datasets have read so far,
        and per dataset Ray Data's progress as its dashboard page shows it (per operator: state,
        tasks finished, estimated blocks and rows) with each operator's rows and bytes in and out
        so far. Ray Data's stats actor is not a public API: without it, only the counts."""
        with self.lock:
            tags = list(self.datasets.get(stage_id, []))
            counts = dict(self.counts.get(stage_id, {}))
        known: dict[str, Any] = {}
        if tags:
            try:
                from ray.data._internal.stats import STATS_ACTOR_NAME, STATS_ACTOR_NAMESPACE

                stats = ray.get_actor(STATS_ACTOR_NAME, namespace=STATS_ACTOR_NAMESPACE)
                known = ray.get(stats.get_datasets.remote(ray.get_runtime_context().get_job_id()), timeout=5)
            except Exception:  # noqa: BLE001 - progress is a nicety: the stage's status stands without it
                known = {}
        datasets = [
            dataset_progress(tag, known.get(tag, {}), counts.get(tag, []))
            for tag in tags
            if tag in known or counts.get(tag)
        ]
        # What each dataset has read: the output of its first operator that makes rows (its source).
        sources = [next((op for op in operators if op["rows_out"]), None) for operators in counts.values()]
        return {
            "rows_read": sum(op["rows_out"] for op in sources if op),
            "bytes_read": sum(op["bytes_out"] for op in sources if op),
            "datasets": datasets,
        }

    @ray.method(concurrency_group="control")
    def logs(self, stage_id: str, offset: int = 0) -> tuple[list[dict[str, Any]], int, str | None]:
        """The stage's log lines from ``offset`` on, the offset after them, and the stage's page in
        the dashboard (``#/jobs/<job>/tasks/<task>``, once it started)."""
        with self.lock:
            found = self.stage_lines.get(stage_id)
            lines, next_offset = found.read(offset) if found else ([], offset)
            return lines, next_offset, self.pages.get(stage_id)

    def pid(self) -> int:
        return os.getpid()


def dataset_progress(tag: str, dataset: dict[str, Any], counts: list[dict[str, Any]]) -> dict[str, Any]:
    """``dataset``: the stats actor's entry (operators in topology order, as ``counts``)."""
    operators = []
    for index, (key, op) in enumerate(dataset.get("operators", {}).items()):
        entry = {
            "name": op.get("name", key),
            "state": op.get("state"),
            "tasks_finished": op.get("progress", 0),
            "blocks_estimated": op.get("total", 0),
            "rows_estimated": op.get("total_rows", 0),
        }
        if index < len(counts):
            entry.update({k: v for k, v in counts[index].items() if k != "name"})
        operators.append(entry)
    if not operators:
        operators = [dict(op) for op in counts]
    return {"dataset": tag, "state": dataset.get("state"), "operators": operators}

"""Rows and bytes each Ray Data operator of the running stage has produced so far, for the
stage's status (on the cluster, in the stage's process). Ray Data keeps these counts in its
streaming executor and exports them only as Prometheus gauges; an execution callback (Ray
Data's ``DataContext.custom_execution_callback_classes``) reads them on each scheduling step."""

from __future__ import annotations

import threading
import time
from typing import Any

from ray.data._internal.execution.execution_callback import ExecutionCallback

INTERVAL_SECONDS = 0.5  # at most this often per dataset: the scheduling loop steps far more often

_lock = threading.Lock()
_datasets: dict[str, list[dict[str, Any]]] = {}  # dataset id -> its operators' counts
_changed = False


class OperatorCounters(ExecutionCallback):
    def __init__(self) -> None:
        self.recorded_at = 0.0

    def on_execution_step(self, executor: Any) -> None:
        if time.monotonic() - self.recorded_at >= INTERVAL_SECONDS:
            self.recorded_at = time.monotonic()
            record(executor)

    def after_execution_succeeds(self, executor: Any) -> None:
        record(executor)

    def after_execution_fails(self, executor: Any, error: Exception) -> None:
        record(executor)


def record(executor: Any) -> None:
    global _changed
    operators = [
        {
            "name": op.name,
            "rows_in": op.metrics.num_row_inputs_received,
            "bytes_in": op.metrics.bytes_inputs_received,
            "rows_out": op.metrics.rows_task_outputs_generated,
            "bytes_out": op.metrics.bytes_task_outputs_generated,
        }
        for op in (executor._topology or {})  # not a public attribute: its operators, in order
    ]
    with _lock:
        _datasets[executor._dataset_id] = operators
        _changed = True


def install() -> None:
    """Count in every dataset this process runs from now on (once per process)."""
    import ray.data

    classes = ray.data.DataContext.get_current().custom_execution_callback_classes
    if OperatorCounters not in classes:
        classes.append(OperatorCounters)


def reset() -> None:
    global _changed
    with _lock:
        _datasets.clear()
        _changed = False


def take_if_changed() -> dict[str, list[dict[str, Any]]] | None:
    """The counts of the datasets run since ``reset``, if they changed since the last call."""
    global _changed
    with _lock:
        if not _changed:
            return None
        _changed = False
        return {dataset: list(operators) for dataset, operators in _datasets.items()}

"""Run an operator's ``execute`` outside a DAG run: only the task instance is a stand-in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class FakeTaskInstance:
    dag_id: str = "tests"
    run_id: str = "manual__2024-01-02T00:00:00+00:00"
    task_id: str = "task"
    try_number: int = 1
    xcoms: dict[str, Any] = field(default_factory=dict)

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcoms[key] = value


def run_operator(operator, run_id: str = "manual__2024-01-02T00:00:00+00:00", try_number: int = 1):
    ti = FakeTaskInstance(run_id=run_id, task_id=operator.task_id, try_number=try_number)
    context = {"ti": ti}
    return operator.execute(context), ti

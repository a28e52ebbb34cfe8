"""Run an operator's ``execute`` outside a DAG run: only the task instance is a stand-in."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any


@dataclass
class FakeTaskInstance:
    dag_id: str = "tests"
    run_id: str = "manual__2024-01-02T00:00:00+00:00"
    task_id: str = "task"
    try_number: int = 1
    xcoms: dict[str, Any] = field(default_factory=dict)
    previous_xcoms: dict[str, Any] | None = None  # the XComs of this task's previous successful run

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcoms[key] = value

    def get_previous_ti(self, state=None):
        return None if self.previous_xcoms is None else SimpleNamespace(run_id="previous", task_id=self.task_id)

    def xcom_pull(self, task_ids=None, key: str = "return_value", run_id: str | None = None, **_: Any) -> Any:
        source = self.previous_xcoms if run_id == "previous" else self.xcoms
        return (source or {}).get(key)


def run_operator(
    operator,
    run_id: str = "manual__2024-01-02T00:00:00+00:00",
    try_number: int = 1,
    previous_xcoms: dict[str, Any] | None = None,
    **context: Any,
):
    ti = FakeTaskInstance(run_id=run_id, task_id=operator.task_id, try_number=try_number, previous_xcoms=previous_xcoms)
    return operator.execute({"ti": ti, **context}), ti


def staging_tables(conn) -> list[str]:
    """The PostgreSQL staging tables a load left behind (not the ``_raydata_loads`` ledger)."""
    rows = conn.execute("SELECT tablename FROM pg_tables WHERE tablename LIKE '\\_raydata\\_%' ORDER BY 1").fetchall()
    return [name for (name,) in rows if name != "_raydata_loads"]

"""What an Airflow run says about the data a stage should handle: incremental windows, the
previous successful run's row count, the time freshness is measured against, and which runs are
still active (for staging retention). Runs on the Airflow worker."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from airflow.utils.state import TaskInstanceState

from airflow_provider_raydata.contracts import CleanupEntry, IncrementalWindow, XCom

log = logging.getLogger(__name__)
ACTIVE_STATES = ["queued", "running"]
RUN_ID_BATCH = 50  # run ids per count request: they travel in the API call's query string


def incremental_window(spec: dict[str, Any], context, task_id: str) -> IncrementalWindow:
    """The incremental window ``[start, end)`` of this run, as ISO timestamps (None: open)."""
    from airflow.sdk.exceptions import AirflowFailException

    from airflow_provider_raydata.hooks.postgres import postgres_watermark

    try:
        check_incremental(spec, task_id)
    except ValueError as exc:
        raise AirflowFailException(str(exc)) from None
    mode = spec.get("mode", "interval")
    start, end = context.get("data_interval_start"), context.get("data_interval_end")
    if mode == "interval" and (start is None or end is None):
        if not spec.get("watermark"):
            raise AirflowFailException(
                f"{task_id}: this run has no data interval (a manual run without a logical date); "
                "give it a logical date, or configure a 'watermark' to catch up from"
            )
        mode = "watermark"
    elif mode == "interval" and start == end:
        raise AirflowFailException(
            f"{task_id}: the data interval is empty ({start} to {end}): Airflow 3 cron schedules such as "
            "'@daily' have zero-length intervals; schedule with CronDataIntervalTimetable or a timedelta"
        )
    if mode == "watermark":
        where = spec["watermark"]
        start = postgres_watermark(where["postgres_conn_id"], where["table"], where.get("column", spec["column"]))
        end = None
    window = IncrementalWindow(
        column=spec["column"],
        start=start.isoformat() if start is not None else None,
        end=end.isoformat() if end is not None else None,
        partitioned=bool(spec.get("partitioned")),
    )
    log.info("Incremental (%s): %s from %s to %s", mode, window.column, window.start, window.end)
    return window


def check_incremental(spec: dict[str, Any], task_id: str) -> None:
    mode = spec.get("mode", "interval")
    if mode not in ("interval", "watermark") or not spec.get("column"):
        raise ValueError(f"{task_id}: incremental needs a 'column' and mode 'interval' or 'watermark' (got {mode!r})")
    if mode == "watermark" and not spec.get("watermark"):
        raise ValueError(f"{task_id}: incremental mode 'watermark' needs 'watermark' (where it is read)")


def interval_end(context) -> str:
    """The time freshness is measured against: the data interval's end, else the run's run_after."""
    end = context.get("data_interval_end") or getattr(context.get("dag_run"), "run_after", None)
    return (end or datetime.now(UTC)).isoformat()


def previous_rows(ti) -> int | None:
    """Rows in at this task's previous successful run (from its ``quality_report`` XCom)."""
    previous = ti.get_previous_ti(state=TaskInstanceState.SUCCESS)
    report = None
    if previous is not None:
        report = ti.xcom_pull(task_ids=ti.task_id, key=XCom.QUALITY_REPORT, run_id=previous.run_id)
    rows = report.get("rows_in") if isinstance(report, dict) else None  # QualityReport.to_dict()
    log.info("Previous successful run of %s: %s, rows in: %s", ti.task_id, previous and previous.run_id, rows)
    return rows


def find_active_runs(candidates: list[CleanupEntry], count_runs: Callable[..., int]) -> list[list[str]]:
    """``[dag_id, run_id]`` of the candidate runs (``clean_staging``'s run entries) that are queued
    or running; ``count_runs``: the Task SDK's ``get_dr_count``."""
    by_dag: dict[str, list[CleanupEntry]] = {}
    for candidate in candidates:
        by_dag.setdefault(candidate.dag_id, []).append(candidate)
    active: list[list[str]] = []
    for dag_id, runs in sorted(by_dag.items()):
        if not count_runs(dag_id=dag_id, states=ACTIVE_STATES):
            continue  # the usual case: one request clears all of a DAG's old runs
        known = sorted({run.run_id for run in runs if run.run_id})
        for start in range(0, len(known), RUN_ID_BATCH):
            batch = known[start : start + RUN_ID_BATCH]
            if count_runs(dag_id=dag_id, run_ids=batch, states=ACTIVE_STATES):
                active += [[dag_id, r] for r in batch if count_runs(dag_id=dag_id, run_ids=[r], states=ACTIVE_STATES)]
        # Nothing committed: no real run id to ask about. Keep it while the DAG has active runs.
        active += [[dag_id, run.run.split("/")[1]] for run in runs if not run.run_id]
    return active

"""The incremental DAG on a real Airflow deployment (scheduler, dag-processor, api-server,
LocalExecutor; tests/airflow_stack.py) against the Ray head and PostgreSQL: `airflow backfill
create` over a week, twice, and a running task marked failed through the REST API.

Every task of a backfill is a fresh Airflow task process with its own Ray Client session (5-10
CPU-seconds each here, far more when four run at once on 2 cores): the 7-day backfill run twice
is 84 task processes and took about 18 minutes on this machine. `make test` therefore backfills
2 days (RAYDATA_BACKFILL_DAYS); `make test-backfill-week` runs the full week.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.airflow_stack import AirflowStack
from tests.conftest import ROOT
from tests.dags.test_incremental import lake_rows, warehouse_rows
from tests.integration.test_faults import committed_attempts, committed_ids, processes, wait_for_processes

pytestmark = [pytest.mark.integration, pytest.mark.slow]
DAYS = int(os.environ.get("RAYDATA_BACKFILL_DAYS", "2"))

PROBE_DAG = """
import json
from datetime import datetime

from airflow.sdk import DAG

from airflow_provider_raydata.operators import RayDataTransformOperator
from tests.slow_functions import slow_double

with DAG("raydata_on_kill_probe", schedule=None, start_date=datetime(2024, 1, 1), catchup=False):
    RayDataTransformOperator(
        task_id="slow", input=json.loads({ref!r}), fn=slow_double, fn_kwargs={{"seconds": 3}}, batch_size=None,
        staging_uri={staging!r},
    )
"""


def snapshot(pg, lake) -> dict:
    tables = {}
    for entity in ("orders", "payments"):
        tables[f"warehouse {entity}"] = warehouse_rows(pg, entity)
        tables[f"lake {entity}"] = lake_rows(lake, entity)
    return tables


def test_backfill_twice_gives_the_same_tables_and_marking_a_task_failed_cancels_its_stage(ray_head, pg, tmp_path):
    import incremental_data

    landing, lake, staging = tmp_path / "landing", tmp_path / "lake", tmp_path / "staging"
    days = incremental_data.generate(DAYS, orders_per_day=40)
    for day in days:  # the source already holds the week: a backfill after the fact
        incremental_data.apply_orders(pg.conn, day)
        incremental_data.write_payments(landing, day)
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "raydata_incremental.py").symlink_to(ROOT / "dags" / "raydata_incremental.py")
    probe_input = committed_ids(tmp_path / "probe_in", files=16, rows_per_file=100)
    probe_staging = tmp_path / "probe_staging"
    (dags / "probe.py").write_text(PROBE_DAG.format(ref=json.dumps(probe_input), staging=str(probe_staging)))
    env = {
        "AIRFLOW_CONN_RAYDATA_DEFAULT": json.dumps(ray_head.connection(staging_uri=str(staging))),
        "AIRFLOW_CONN_PG_TEST": os.environ["AIRFLOW_CONN_PG_TEST"],
        "RAYDATA_POSTGRES_CONN_ID": pg.conn_id,
        "RAYDATA_LANDING_URI": str(landing),
        "RAYDATA_LAKE_URI": str(lake),
        "PYTHONPATH": str(ROOT),
        # No scheduled run for the latest interval when the DAG is unpaused: only the backfills.
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
    }
    with AirflowStack(tmp_path / "home", dags, env) as stack:
        last, timeout = days[-1].day.isoformat(), 600 + 200 * DAYS
        first_runs = stack.backfill("raydata_incremental", "2024-01-01", last, timeout=timeout)
        assert [r["state"] for r in first_runs] == ["success"] * DAYS, first_runs
        first = snapshot(pg, lake)
        # Ray's own log lines in the task processes (the client session's) keep their levels: no
        # stderr lines, which the task log shows as ERROR.
        stderr = [
            line
            for log in stack.logs.glob("dag_id=raydata_incremental/*/*/attempt=*.log")
            for line in log.read_text().splitlines()
            if '"logger":"task.stderr"' in line
        ]
        assert stderr == [], stderr[:5]
        # The same contents as daily scheduled runs (tests/dags/test_incremental.py runs them day by day).
        orders, payments = incremental_data.expected_state(days)
        assert first["warehouse orders"] == orders and first["warehouse payments"] == payments
        assert first["lake orders"] == orders and first["lake payments"] == payments

        again = stack.backfill("raydata_incremental", "2024-01-01", last, reprocess="completed", timeout=timeout)
        assert [r["state"] for r in again] == ["success"] * DAYS, again
        assert snapshot(pg, lake) == first  # rerunning the whole week changed nothing
        leftovers = pg.conn.execute(
            "SELECT tablename FROM pg_tables WHERE tablename LIKE '\\_raydata\\_%' AND tablename <> '_raydata_loads'"
        ).fetchall()
        assert leftovers == [] and list(lake.glob("*/_staging/*")) == []

        # Marking a running task failed (as in the UI) runs on_kill: its Ray task is cancelled.
        stack.wait_for_dag("raydata_on_kill_probe")
        stack.unpause("raydata_on_kill_probe")
        run_id = stack.api("POST", "dags/raydata_on_kill_probe/dagRuns", json={"logical_date": None})["dag_run_id"]
        stage = wait_for_processes("ray::raydata_on_kill_probe.slow", timeout=180)[0]
        marked = time.monotonic()
        stack.set_task_state("raydata_on_kill_probe", run_id, "slow", "failed")
        stage.wait(timeout=30)
        assert time.monotonic() - marked < 30
        assert stack.task_instance("raydata_on_kill_probe", run_id, "slow")["state"] == "failed"
    assert processes("ray::raydata_on_kill_probe.slow") == []
    assert committed_attempts(probe_staging, "slow") == []

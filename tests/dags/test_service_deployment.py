"""The example DAGs on a real Airflow deployment (scheduler, dag-processor, api-server and a
triggerer; tests/airflow_stack.py) over the stage service's HTTP transport, with every operator
deferrable by default (``[operators] default_deferrable``), against the Ray head and PostgreSQL.

One deployment serves the module's tests, in order: the daily DAG end to end; a 3-day backfill of
the incremental DAG, twice (its PostgreSQL loads are held open on the cluster and committed by the
trigger); the triggerer killed and restarted mid-stage; a deferred task marked failed; a wrong token.
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pandas as pd
import pytest

from tests.airflow_stack import AirflowStack
from tests.conftest import ROOT, SERVICE_TOKEN, new_database
from tests.dags.test_backfill import snapshot
from tests.dags.test_daily_batch import expected_revenue, lake_partition, warehouse_day
from tests.integration.test_faults import committed_attempts, committed_ids, processes, wait_for_processes

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BACKFILL_DAYS = 3

PROBE_DAGS = """
import json
from datetime import datetime

from airflow.sdk import DAG

from airflow_provider_raydata.operators import RayDataTransformOperator
from tests.slow_functions import slow_double

PROBES = {{
    "raydata_deferred_killed": ("raydata_default", 3),
    "raydata_triggerer_restart": ("raydata_default", 2),
    "raydata_wrong_token": ("raydata_wrong_token", 0),
}}
for dag_id, (conn_id, seconds) in PROBES.items():
    with DAG(dag_id, schedule=None, start_date=datetime(2024, 1, 1), catchup=False):
        RayDataTransformOperator(
            task_id="slow", input=json.loads({ref!r}), fn=slow_double, fn_kwargs={{"seconds": seconds}},
            batch_size=None, staging_uri={staging!r}, raydata_conn_id=conn_id, poll_interval=0.5,
        )
"""
WRONG_TOKEN = "not-the-service-token-1234"


@pytest.fixture(scope="module")
def deployment(ray_head, stage_service, postgres_server, sample_data, tmp_path_factory):
    import incremental_data

    root = tmp_path_factory.mktemp("deployment")
    landing, lake, staging, probe_staging = (root / n for n in ("landing", "lake", "staging", "probe_staging"))
    dags = root / "dags"
    dags.mkdir()
    for name in ("raydata_daily_batch.py", "raydata_incremental.py"):
        (dags / name).symlink_to(ROOT / "dags" / name)
    probe_input = committed_ids(root / "probe_in", files=8, rows_per_file=100)
    (dags / "probes.py").write_text(PROBE_DAGS.format(ref=json.dumps(probe_input), staging=str(probe_staging)))
    service = {
        "conn_type": "raydata",
        "host": stage_service,
        "password": SERVICE_TOKEN,
        "extra": {"dashboard_url": ray_head.dashboard_url, "staging_uri": str(staging)},
    }
    with new_database(postgres_server) as db:
        days = incremental_data.generate(BACKFILL_DAYS, orders_per_day=40)
        for day in days:  # the source already holds the days: a backfill after the fact
            incremental_data.apply_orders(db.conn, day)
            incremental_data.write_payments(landing, day)
        env = {
            "AIRFLOW_CONN_RAYDATA_DEFAULT": json.dumps(service),
            "AIRFLOW_CONN_RAYDATA_WRONG_TOKEN": json.dumps({**service, "password": WRONG_TOKEN}),
            "AIRFLOW_CONN_PG_TEST": db.airflow_conn,
            "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": "True",
            "AIRFLOW__RAYDATA__WAIT_BEFORE_DEFERRING": "0",  # every stage defers, however short
            # A restarted triggerer takes over the killed one's triggers once its heartbeat is this old.
            "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "10",
            "RAYDATA_POSTGRES_CONN_ID": db.conn_id,
            "RAYDATA_SOURCE_URI": str(sample_data),
            "RAYDATA_LANDING_URI": str(landing),
            "RAYDATA_LAKE_URI": str(lake),
            "PYTHONPATH": str(ROOT),
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",  # only the runs a test asks for
        }
        with AirflowStack(root / "home", dags, env, triggerer=True) as stack:
            yield SimpleNamespace(
                stack=stack,
                pg=db,
                lake=lake,
                days=days,
                probe_staging=probe_staging,
                sample_data=sample_data,
                dashboard_url=ray_head.dashboard_url,
            )


def trigger(stack: AirflowStack, dag_id: str, **conf) -> str:
    stack.wait_for_dag(dag_id)
    stack.unpause(dag_id)
    return stack.api("POST", f"dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf})["dag_run_id"]


def trigger_logs(stack: AirflowStack, dag_id: str, run_id: str, task_id: str) -> str:
    folder = stack.logs / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
    return "".join(p.read_text() for p in folder.glob("attempt=*.log.trigger*"))


def task_log(stack: AirflowStack, dag_id: str, run_id: str, task_id: str) -> str:
    path = f"dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/1"
    return json.dumps(stack.api("GET", path, full_content=True))


def test_the_daily_dag_runs_deferred_end_to_end_on_the_service(deployment):
    stack, day = deployment.stack, "2024-01-02"
    run_id = trigger(stack, "raydata_daily_batch", date=day)
    run = stack.wait_for_run("raydata_daily_batch", run_id, timeout=600)
    assert run["state"] == "success", run
    expected = expected_revenue(deployment.sample_data, day)
    pd.testing.assert_frame_equal(lake_partition(deployment.lake, day), expected, check_dtype=False, rtol=1e-9)
    pd.testing.assert_frame_equal(warehouse_day(deployment.pg, day), expected, check_dtype=False, rtol=1e-9)
    tasks = stack.api("GET", f"dags/raydata_daily_batch/dagRuns/{run_id}/taskInstances")["task_instances"]
    assert len(tasks) == 9 and {t["state"] for t in tasks} == {"success"}
    for task in tasks:  # every stage waited in the triggerer, not in a worker slot, and logged there
        assert "[stage]" in trigger_logs(stack, "raydata_daily_batch", run_id, task["task_id"]), task["task_id"]
    assert "Starting execution of Dataset" in task_log(stack, "raydata_daily_batch", run_id, "clean_lineitem")
    assert_dashboard_link(stack, deployment.dashboard_url, "raydata_daily_batch", run_id, "clean_lineitem")


def assert_dashboard_link(stack: AirflowStack, dashboard_url: str, dag_id: str, run_id: str, task_id: str) -> None:
    """The task's 'Ray Dashboard' link opens its stage's task page, named after the DAG, task and run."""
    from ray.util.state import get_task

    links = stack.api("GET", f"dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/links")["extra_links"]
    prefix = f"{dashboard_url}/#/jobs/"
    assert (links["Ray Dashboard"] or "").startswith(prefix), links
    job_id, _, ray_task_id = links["Ray Dashboard"].removeprefix(prefix).split("/")
    task = get_task(ray_task_id, address=dashboard_url)
    assert task is not None and task.job_id == job_id and task.name == f"{dag_id}.{task_id}@{run_id}", task


def test_a_backfill_through_the_service_twice_gives_the_expected_tables(deployment):
    import incremental_data

    stack, pg, lake = deployment.stack, deployment.pg, deployment.lake
    last = deployment.days[-1].day.isoformat()
    first_runs = stack.backfill("raydata_incremental", "2024-01-01", last, timeout=900)
    assert [r["state"] for r in first_runs] == ["success"] * BACKFILL_DAYS, first_runs
    first = snapshot(pg, lake)
    orders, payments = incremental_data.expected_state(deployment.days)
    assert first["warehouse orders"] == orders and first["warehouse payments"] == payments
    assert first["lake orders"] == orders and first["lake payments"] == payments

    again = stack.backfill("raydata_incremental", "2024-01-01", last, reprocess="completed", timeout=900)
    assert [r["state"] for r in again] == ["success"] * BACKFILL_DAYS, again
    assert snapshot(pg, lake) == first  # every held load was committed exactly once
    leftovers = pg.conn.execute(
        "SELECT tablename FROM pg_tables WHERE tablename LIKE '\\_raydata\\_%' AND tablename <> '_raydata_loads'"
    ).fetchall()
    assert leftovers == [] and list(lake.glob("*/_staging/*")) == []


def wait_until_polled(stack: AirflowStack, dag_id: str, run_id: str, timeout: float = 120) -> None:
    """Until a triggerer polls the task's stage (its trigger log shows the stage's lines)."""
    deadline = time.monotonic() + timeout
    while "[stage]" not in trigger_logs(stack, dag_id, run_id, "slow"):
        assert time.monotonic() < deadline, "no triggerer polled the stage"
        time.sleep(0.5)


def test_a_triggerer_killed_mid_stage_is_restarted_and_the_task_completes(deployment):
    stack, dag_id = deployment.stack, "raydata_triggerer_restart"
    run_id = trigger(stack, dag_id)
    stack.wait_for_task_state(dag_id, run_id, "slow", ["deferred"], timeout=180)
    wait_until_polled(stack, dag_id, run_id)
    stack.kill("triggerer")
    try:
        assert processes(f"ray::{dag_id}.slow")  # the stage runs on while no triggerer watches it
    finally:
        stack.restart("triggerer")  # the module's later tests need one
    ti = stack.wait_for_task_state(dag_id, run_id, "slow", ["success", "failed"], timeout=240)
    assert ti["state"] == "success", ti
    assert len(committed_attempts(deployment.probe_staging, "slow")) == 1


def test_a_deferred_task_marked_failed_has_its_stage_cancelled(deployment):
    stack, dag_id = deployment.stack, "raydata_deferred_killed"
    committed_before = committed_attempts(deployment.probe_staging, "slow")
    run_id = trigger(stack, dag_id)
    stack.wait_for_task_state(dag_id, run_id, "slow", ["deferred"], timeout=180)
    stage = wait_for_processes(f"ray::{dag_id}.slow", timeout=120)[0]
    # on_kill runs in the triggerer: wait until it polls this stage. (A task marked failed before
    # any triggerer picked up its trigger is not cancelled: see the README.)
    wait_until_polled(stack, dag_id, run_id)
    stack.set_task_state(dag_id, run_id, "slow", "failed")
    stage.wait(timeout=60)  # the trigger's on_kill cancelled the stage: its process is gone
    assert stack.task_instance(dag_id, run_id, "slow")["state"] == "failed"
    assert processes(f"ray::{dag_id}.slow") == []
    assert committed_attempts(deployment.probe_staging, "slow") == committed_before


def test_a_wrong_token_fails_the_task_naming_the_url_and_never_the_token(deployment, stage_service):
    stack, dag_id = deployment.stack, "raydata_wrong_token"
    run_id = trigger(stack, dag_id)
    ti = stack.wait_for_task_state(dag_id, run_id, "slow", ["success", "failed"], timeout=180)
    assert ti["state"] == "failed", ti
    log = task_log(stack, dag_id, run_id, "slow")
    assert f"The stage service at {stage_service} rejected the token" in log
    everything = "".join(p.read_text(errors="replace") for p in stack.logs.rglob("*.log*") if p.is_file())
    assert WRONG_TOKEN not in everything and SERVICE_TOKEN not in everything

"""Deferrable operators on a real Airflow deployment (scheduler, dag-processor, api-server and a
triggerer; tests/airflow_stack.py) over the stage service's HTTP transport: a deferred stage
completes through the trigger, and a deferred task marked failed has its stage cancelled."""

from __future__ import annotations

import json
import time

import pytest

from tests.airflow_stack import AirflowStack
from tests.conftest import ROOT
from tests.integration.test_faults import committed_attempts, committed_ids, processes, wait_for_processes

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEFERRED_DAG = """
import json
from datetime import datetime

from airflow.sdk import DAG

from airflow_provider_raydata.operators import RayDataTransformOperator
from tests.slow_functions import slow_double

for dag_id, seconds in (("raydata_deferred_ok", 0.5), ("raydata_deferred_killed", 3)):
    with DAG(dag_id, schedule=None, start_date=datetime(2024, 1, 1), catchup=False):
        RayDataTransformOperator(
            task_id="slow", input=json.loads({ref!r}), fn=slow_double, fn_kwargs={{"seconds": seconds}},
            batch_size=None, staging_uri={staging!r}, deferrable=True, poll_interval=0.5,
        )
"""


def test_a_deferred_stage_completes_through_the_trigger_and_marking_it_failed_cancels_it(service_conn, tmp_path):
    ref = committed_ids(tmp_path / "in", files=16, rows_per_file=100)
    staging = tmp_path / "staging"
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "deferred.py").write_text(DEFERRED_DAG.format(ref=json.dumps(ref), staging=str(staging)))
    env = {"AIRFLOW_CONN_RAYDATA_DEFAULT": json.dumps(service_conn), "PYTHONPATH": str(ROOT)}
    with AirflowStack(tmp_path / "home", dags, env, triggerer=True) as stack:
        for dag_id in ("raydata_deferred_ok", "raydata_deferred_killed"):
            stack.wait_for_dag(dag_id)
            stack.unpause(dag_id)
        ok = stack.api("POST", "dags/raydata_deferred_ok/dagRuns", json={"logical_date": None})["dag_run_id"]
        stack.wait_for_task_state("raydata_deferred_ok", ok, "slow", ["deferred"], timeout=180)
        ti = stack.wait_for_task_state("raydata_deferred_ok", ok, "slow", ["success", "failed"], timeout=240)
        assert ti["state"] == "success", ti
        assert len(committed_attempts(staging, "slow")) == 1
        log = stack.api("GET", f"dags/raydata_deferred_ok/dagRuns/{ok}/taskInstances/slow/logs/1", full_content=True)
        text = json.dumps(log)
        assert "[stage] Starting execution of Dataset" in text  # the stage's lines, through the trigger

        killed = stack.api("POST", "dags/raydata_deferred_killed/dagRuns", json={"logical_date": None})["dag_run_id"]
        stack.wait_for_task_state("raydata_deferred_killed", killed, "slow", ["deferred"], timeout=180)
        stage = wait_for_processes("ray::raydata_deferred_killed.slow", timeout=120)[0]
        # on_kill runs in the triggerer: wait until it polls this stage. (A task marked failed before
        # any triggerer picked up its trigger is not cancelled: see the README.)
        trigger_log = stack.logs / "dag_id=raydata_deferred_killed" / f"run_id={killed}" / "task_id=slow"
        deadline = time.monotonic() + 120
        while "[stage]" not in "".join(p.read_text() for p in trigger_log.glob("attempt=1.log.trigger*")):
            assert time.monotonic() < deadline, "the triggerer never polled the stage"
            time.sleep(0.5)
        stack.set_task_state("raydata_deferred_killed", killed, "slow", "failed")
        stage.wait(timeout=60)  # the trigger's on_kill cancelled the stage: its process is gone
        assert stack.task_instance("raydata_deferred_killed", killed, "slow")["state"] == "failed"
    assert processes("ray::raydata_deferred_killed.slow") == []
    assert len(committed_attempts(staging, "slow")) == 1  # only the first DAG's

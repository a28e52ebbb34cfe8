"""The cleanup operator asks Airflow's task API which runs are active (dag.test runs a real task
runner) and cleans the staging area in stages on the Ray head, over ray://."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

pytestmark = pytest.mark.integration

DAG_FILE = """
import json, os, time
from datetime import datetime

from airflow.sdk import DAG, task

from airflow_provider_raydata.operators import RayDataStagingCleanupOperator
from airflow_provider_raydata.runtime.paths import safe_segment

STAGING = {staging!r}


def old_output(run_id):
    path = os.path.join(STAGING, "cleanup_probe", safe_segment(run_id), "extract", "attempt-1-abcd")
    os.makedirs(path)
    produced_by = {{"dag_id": "cleanup_probe", "run_id": run_id, "task_id": "extract", "try_number": 1}}
    with open(os.path.join(path, "_SUCCESS"), "w") as out:
        json.dump({{"uri": path, "produced_by": produced_by}}, out)
    stamp = time.time() - 30 * 86400
    os.utime(os.path.join(path, "_SUCCESS"), (stamp, stamp))


with DAG(dag_id="cleanup_probe", schedule="@daily", start_date=datetime(2024, 1, 1), catchup=False):

    @task
    def outputs(dag_run=None):
        old_output(dag_run.run_id)  # 30 days old, but this run is running while the cleanup runs

    outputs() >> RayDataStagingCleanupOperator(task_id="clean", staging_uri=STAGING, retention_days=7)
"""


def test_cleanup_keeps_a_running_runs_output_and_removes_a_finished_ones(airflow_db, ray_head, tmp_path, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    from airflow_provider_raydata.runtime.paths import safe_segment

    staging, dags = tmp_path / "staging", tmp_path / "dags"
    dags.mkdir()
    (dags / "probe.py").write_text(DAG_FILE.format(staging=str(staging)))
    bundle = {"name": "probe", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle"}
    bundle["kwargs"] = {"path": str(dags)}
    monkeypatch.setenv("AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST", json.dumps([bundle]))
    monkeypatch.setenv("AIRFLOW_CONN_RAYDATA_DEFAULT", json.dumps(ray_head.connection()))
    dag = DagBag(dag_folder=str(dags)).dags["cleanup_probe"]

    first = dag.test(logical_date=datetime(2024, 1, 1, tzinfo=UTC))
    assert first.state == "success"
    assert run_dirs(staging) == [safe_segment(first.run_id)]  # kept: its run was running
    second = dag.test(logical_date=datetime(2024, 1, 2, tzinfo=UTC))
    assert second.state == "success"
    assert run_dirs(staging) == [safe_segment(second.run_id)]  # the first run has finished since


def run_dirs(staging) -> list[str]:
    return sorted(p.name for p in (staging / "cleanup_probe").iterdir())

"""The row-count change check's lookup of the previous successful run, through Airflow's own
task API (dag.test runs the task in a real task runner)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

pytestmark = pytest.mark.integration

DAG_FILE = """
from datetime import datetime

from airflow.sdk import DAG, task

from airflow_provider_raydata.run_context import previous_rows

with DAG(dag_id="previous_rows_probe", schedule="@daily", start_date=datetime(2024, 1, 1), catchup=False):

    @task(task_id="quality")
    def quality(ti=None, dag_run=None):
        rows = {1: 800, 2: 1000}[dag_run.logical_date.day]
        ti.xcom_push(key="quality_report", value={"rows_in": rows})
        return previous_rows(ti)

    quality()
"""


def test_previous_successful_run_rows_come_from_its_quality_report(airflow_db, tmp_path, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    (tmp_path / "probe.py").write_text(DAG_FILE)
    bundle = {"name": "probe", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle"}
    bundle["kwargs"] = {"path": str(tmp_path)}  # dag.test serialises the DAGs of the configured bundles
    monkeypatch.setenv("AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST", json.dumps([bundle]))
    dag = DagBag(dag_folder=str(tmp_path)).dags["previous_rows_probe"]
    first = dag.test(logical_date=datetime(2024, 1, 1, tzinfo=UTC))
    second = dag.test(logical_date=datetime(2024, 1, 2, tzinfo=UTC))
    assert first.state == second.state == "success"
    assert [returned(dag.dag_id, run.run_id) for run in (first, second)] == [None, 800]


def returned(dag_id: str, run_id: str):
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        xcom = session.scalars(
            select(XComModel).where(
                XComModel.dag_id == dag_id, XComModel.run_id == run_id, XComModel.key == "return_value"
            )
        ).first()
        return None if xcom is None else XComModel.deserialize_value(xcom)

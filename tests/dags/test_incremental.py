"""The incremental DAG, loaded from dags/ and run with dag.test() day by day against the Ray
head and a real PostgreSQL server, while the source changes between the runs."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PARTITIONS = {"orders": ("order_id", "order_date"), "payments": ("payment_id", "paid_date")}


def load_dag(monkeypatch, ray_head, pg, tmp_path):
    connection = ray_head.connection(staging_uri=str(tmp_path / "stg"))
    monkeypatch.setenv("AIRFLOW_CONN_RAYDATA_DEFAULT", json.dumps(connection))
    monkeypatch.setenv("RAYDATA_POSTGRES_CONN_ID", pg.conn_id)
    monkeypatch.setenv("RAYDATA_LANDING_URI", str(tmp_path / "landing"))
    monkeypatch.setenv("RAYDATA_LAKE_URI", str(tmp_path / "lake"))
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert not bag.import_errors, bag.import_errors
    return bag.dags["raydata_incremental"]


def xcom(run, task_id: str, key: str = "return_value"):
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        query = XComModel.get_many(run_id=run.run_id, dag_ids=run.dag_id, task_ids=task_id, key=key)
        return XComModel.deserialize_value(session.scalars(query).one())


def warehouse_rows(pg, entity: str) -> dict[int, dict]:
    key = PARTITIONS[entity][0]
    with pg.conn.cursor() as cur:
        cur.execute(f"SELECT * FROM public.{entity}")
        names = [c.name for c in cur.description]
        rows = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
    keyed = {row[key]: row for row in rows}
    assert len(keyed) == len(rows), f"duplicate keys in {entity}"
    return keyed


def lake_rows(lake, entity: str) -> dict[int, dict]:
    key, partition = PARTITIONS[entity]
    partitioning = pads.partitioning(pa.schema([(partition, pa.date32())]), flavor="hive")
    rows = pads.dataset(lake / entity, format="parquet", partitioning=partitioning).to_table().to_pylist()
    keyed = {row[key]: row for row in rows}
    assert len(keyed) == len(rows), f"duplicate keys in the {entity} lake"
    return keyed


def assert_targets_hold(pg, lake, days) -> None:
    import incremental_data

    expected = dict(zip(("orders", "payments"), incremental_data.expected_state(days), strict=True))
    for entity, rows in expected.items():
        assert warehouse_rows(pg, entity) == rows, f"warehouse {entity}"
        assert lake_rows(lake, entity) == rows, f"lake {entity}"
    assert sum(row["is_deleted"] for row in expected["orders"].values()) > 0  # tombstones were exercised


def test_daily_runs_upsert_only_the_changes_and_keep_the_latest_version(
    monkeypatch, airflow_db, ray_head, pg, tmp_path
):
    import incremental_data

    dag = load_dag(monkeypatch, ray_head, pg, tmp_path)
    days = incremental_data.generate(4, orders_per_day=60)
    for day in days[:3]:
        incremental_data.apply_orders(pg.conn, day)
        incremental_data.write_payments(tmp_path / "landing", day)
        # dag.test(logical_date=X) runs the data interval that ends at X, as a manual run does.
        run = dag.test(logical_date=datetime(day.day.year, day.day.month, day.day.day + 1, tzinfo=UTC))
        assert run.state == "success"
        # Each run read its own day's changes only, not the history.
        assert xcom(run, "extract_orders")["num_rows"] == len(day.orders)
    assert_targets_hold(pg, tmp_path / "lake", days[:3])

    # Rerunning a past day changes nothing: its rows are older than what the targets hold.
    rerun = dag.test(logical_date=datetime(2024, 1, 3, tzinfo=UTC))
    assert rerun.state == "success"
    assert_targets_hold(pg, tmp_path / "lake", days[:3])

    # A quiet day: no order changed and no payments partition landed. Both extracts commit zero
    # rows with their columns, the upserts change nothing, and the run succeeds.
    quiet_end = datetime.combine(days[2].day + timedelta(days=2), datetime.min.time(), tzinfo=UTC)
    quiet = dag.test(logical_date=quiet_end)
    assert quiet.state == "success"
    for entity in ("orders", "payments"):
        ref = xcom(quiet, f"extract_{entity}")
        assert ref["num_rows"] == 0 and "updated_at" in ref["schema"], ref
    assert_targets_hold(pg, tmp_path / "lake", days[:3])

    # A manual run without a logical date has no data interval: it catches up from the watermark.
    incremental_data.apply_orders(pg.conn, days[3])
    incremental_data.write_payments(tmp_path / "landing", days[3])
    manual = dag.test(logical_date=None)
    assert manual.state == "success"
    assert_targets_hold(pg, tmp_path / "lake", days)

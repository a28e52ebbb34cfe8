"""The example daily DAG, loaded from dags/ and run with dag.test() against the Ray head."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from types import SimpleNamespace

import pandas as pd
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT
from tests.dags.test_incremental import xcom

pytestmark = pytest.mark.integration


def load_dag(monkeypatch, source, lake):
    monkeypatch.setenv("RAYDATA_SOURCE_URI", str(source))
    monkeypatch.setenv("RAYDATA_LAKE_URI", str(lake))
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert not bag.import_errors, bag.import_errors
    return bag.dags["raydata_daily_batch"]


def expected_revenue(source, day: str) -> pd.DataFrame:
    """The same business logic in plain pandas, straight from the source files."""
    lines = pq.read_table(f"{source}/lineitem/{day}").to_pandas()
    lines = lines.drop_duplicates(["l_orderkey", "l_linenumber"])
    lines = lines[lines["l_returnflag"] != "R"]
    price = lines["l_extendedprice"].astype(float)
    lines = lines.assign(revenue=price * (1 - lines["l_discount"]) * (1 + lines["l_tax"]))
    orders = pacsv.read_csv(f"{source}/orders/{day}/orders.csv").to_pandas()
    orders = orders[orders["o_totalprice"] > 0]
    customer = pq.read_table(f"{source}/customer").to_pandas()
    nation = pq.read_table(f"{source}/nation").to_pandas()
    joined = (
        lines.merge(orders, left_on="l_orderkey", right_on="o_orderkey")
        .merge(customer, left_on="o_custkey", right_on="c_custkey")
        .merge(nation, left_on="c_nationkey", right_on="n_nationkey")
    )
    return (
        joined.groupby(["c_mktsegment", "n_name"])
        .agg(revenue=("revenue", "sum"), orders=("l_orderkey", "nunique"), lines=("l_orderkey", "size"))
        .sort_index()
    )


def lake_partition(lake, day: str) -> pd.DataFrame:
    frame = pq.read_table(f"{lake}/daily_revenue/o_orderdate={day}").to_pandas()
    return frame.set_index(["c_mktsegment", "n_name"])[["revenue", "orders", "lines"]].sort_index()


def test_dag_parses_with_its_tasks(monkeypatch, airflow_db, tmp_path):
    dag = load_dag(monkeypatch, tmp_path, tmp_path)
    assert {t.task_id for t in dag.tasks} == {
        "extract_orders",
        "extract_lineitem",
        "extract_customer",
        "extract_nation",
        "clean_lineitem",
        "daily_revenue",
        "quality",
        "load",
    }
    assert dag.get_task("daily_revenue").upstream_task_ids == {
        "clean_lineitem",
        "extract_orders",
        "extract_customer",
        "extract_nation",
    }
    assert dag.get_task("load").upstream_task_ids == {"quality"}


def test_run_date_for_scheduled_manual_and_param_runs():
    import importlib.util

    spec = importlib.util.spec_from_file_location("daily", ROOT / "dags" / "raydata_daily_batch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    scheduled = SimpleNamespace(data_interval_start=datetime(2024, 1, 5, tzinfo=UTC), run_after=None)
    manual = SimpleNamespace(data_interval_start=None, run_after=datetime(2024, 2, 1, 13, tzinfo=UTC))
    assert module.run_date({"date": None}, scheduled) == "2024-01-05"
    assert module.run_date({"date": None}, manual) == "2024-02-01"
    assert module.run_date({"date": "2023-12-31"}, manual) == "2023-12-31"


def warehouse_day(pg, day: str) -> pd.DataFrame:
    frame = pd.DataFrame(
        pg.conn.execute(
            "SELECT c_mktsegment, n_name, revenue, orders, lines FROM daily_revenue WHERE o_orderdate = %s", [day]
        ).fetchall(),
        columns=["c_mktsegment", "n_name", "revenue", "orders", "lines"],
    )
    return frame.set_index(["c_mktsegment", "n_name"]).sort_index()


def test_daily_dag_end_to_end_on_ray_and_rerun_without_duplicates(
    monkeypatch, airflow_db, ray_head, sample_data, tmp_path, pg
):
    lake = tmp_path / "lake"
    conn = ray_head.connection(staging_uri=str(tmp_path / "staging"))
    monkeypatch.setenv("AIRFLOW_CONN_RAYDATA_DEFAULT", json.dumps(conn))
    monkeypatch.setenv("RAYDATA_POSTGRES_CONN_ID", pg.conn_id)  # adds the warehouse load
    dag = load_dag(monkeypatch, sample_data, lake)
    assert dag.get_task("load_warehouse").upstream_task_ids == {"quality"}

    run = dag.test(logical_date=datetime(2024, 1, 2, tzinfo=UTC))
    assert run.state == "success"
    # The 'Ray Dashboard' link opens the stage's own task page (the service test checks what it shows).
    link = xcom(run, "clean_lineitem", key="ray_dashboard_url")
    assert link.startswith(f"{ray_head.dashboard_url}/#/jobs/") and "/tasks/" in link, link
    expected = expected_revenue(sample_data, "2024-01-02")
    got = lake_partition(lake, "2024-01-02")
    assert len(got) == len(expected) > 50
    pd.testing.assert_frame_equal(got, expected, check_dtype=False, rtol=1e-9)
    pd.testing.assert_frame_equal(warehouse_day(pg, "2024-01-02"), expected, check_dtype=False, rtol=1e-9)

    # A manual run without a logical date, for the same day through the param: replaces the
    # day's partition, never duplicates it.
    rerun = dag.test(logical_date=None, run_conf={"date": "2024-01-02"})
    assert rerun.state == "success"
    pd.testing.assert_frame_equal(lake_partition(lake, "2024-01-02"), expected, check_dtype=False, rtol=1e-9)
    pd.testing.assert_frame_equal(warehouse_day(pg, "2024-01-02"), expected, check_dtype=False, rtol=1e-9)
    assert pg.conn.execute("SELECT count(*) FROM daily_revenue").fetchone()[0] == len(expected)
    assert [p.name for p in (lake / "daily_revenue").iterdir() if not p.name.startswith("_")] == [
        "o_orderdate=2024-01-02"
    ]


def test_a_quiet_day_and_a_missing_day_skip_the_run_with_the_reason_and_change_nothing(
    monkeypatch, airflow_db, ray_head, sample_data, tmp_path, pg
):
    import shutil

    source, lake = tmp_path / "source", tmp_path / "lake"
    for table in ("customer", "nation"):
        shutil.copytree(sample_data / table, source / table)
    # 2024-01-05: a header-only orders file and an empty lineitem file; 2024-01-06: no files at all.
    (source / "orders" / "2024-01-05").mkdir(parents=True)
    header = (sample_data / "orders" / "2024-01-02" / "orders.csv").read_text().splitlines()[0]
    (source / "orders" / "2024-01-05" / "orders.csv").write_text(header + "\n")
    (source / "lineitem" / "2024-01-05").mkdir(parents=True)
    lines = pq.read_schema(next((sample_data / "lineitem" / "2024-01-02").glob("*.parquet")))
    pq.write_table(lines.empty_table(), source / "lineitem" / "2024-01-05" / "part-0.parquet")
    conn = ray_head.connection(staging_uri=str(tmp_path / "staging"))
    monkeypatch.setenv("AIRFLOW_CONN_RAYDATA_DEFAULT", json.dumps(conn))
    monkeypatch.setenv("RAYDATA_POSTGRES_CONN_ID", pg.conn_id)
    pg.conn.execute("CREATE TABLE daily_revenue (o_orderdate date, revenue double precision)")
    pg.conn.execute("INSERT INTO daily_revenue VALUES ('2024-01-04', 1.0)")
    dag = load_dag(monkeypatch, source, lake)
    for day in ("2024-01-05", "2024-01-06"):
        run = dag.test(logical_date=None, run_conf={"date": day})
        assert run.state == "success", day
        states = {ti.task_id: ti.state for ti in run.get_task_instances()}
        assert states["extract_orders"] == states["extract_lineitem"] == "skipped", states
        assert {states[t] for t in ("clean_lineitem", "daily_revenue", "quality", "load", "load_warehouse")} == {
            "skipped"
        }
    assert not lake.exists() or not list(lake.rglob("*.parquet"))
    assert pg.conn.execute("SELECT * FROM daily_revenue").fetchall() == [(datetime(2024, 1, 4).date(), 1.0)]

"""Daily batch on TPC-H-shaped data, every stage on a Ray cluster.

extract orders (CSV), lineitem (Parquet), customer and nation -> clean lineitem (a pandas
function plus declarative steps) -> join and aggregate daily revenue per market segment and
nation -> quality checks -> load into a Parquet lake partitioned by date and, when a
PostgreSQL connection is configured, into a warehouse table (the day's rows replaced).

The day processed is the run's data interval start (scheduled runs and backfills), the
``date`` param when a run is triggered with one, else the day of the run's ``run_after``
(a manual run in Airflow 3 may have no logical date).

Settings (environment): RAYDATA_SOURCE_URI (default $AIRFLOW_HOME/raydata/source),
RAYDATA_LAKE_URI (default $AIRFLOW_HOME/raydata/lake), RAYDATA_POSTGRES_CONN_ID (an Airflow
``postgres`` connection: adds the warehouse load) and RAYDATA_POSTGRES_TABLE (default
public.daily_revenue). The Ray cluster and staging location come from the ``raydata_default``
connection; without one, an embedded local Ray is used.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from airflow.sdk import DAG, Param

from airflow_provider_raydata.operators import (
    RayDataExtractOperator,
    RayDataLoadOperator,
    RayDataQualityOperator,
    RayDataTransformOperator,
)

if TYPE_CHECKING:  # the function runs on the cluster: parsing this file does not import pandas
    import pandas as pd

AIRFLOW_HOME = os.environ.get("AIRFLOW_HOME", os.path.expanduser("~/airflow"))
SOURCE = os.environ.get("RAYDATA_SOURCE_URI", f"{AIRFLOW_HOME}/raydata/source")
LAKE = os.environ.get("RAYDATA_LAKE_URI", f"{AIRFLOW_HOME}/raydata/lake")
POSTGRES_CONN_ID = os.environ.get("RAYDATA_POSTGRES_CONN_ID")
POSTGRES_TABLE = os.environ.get("RAYDATA_POSTGRES_TABLE", "public.daily_revenue")
SEGMENTS = ["AUTOMOBILE", "BUILDING", "FURNITURE", "HOUSEHOLD", "MACHINERY"]


def run_date(params: dict, dag_run) -> str:
    """The day this run processes, as YYYY-MM-DD."""
    if params.get("date"):
        return params["date"]
    start = getattr(dag_run, "data_interval_start", None)
    return (start or dag_run.run_after).date().isoformat()


def net_revenue(batch: pd.DataFrame) -> pd.DataFrame:
    """Revenue after discount and tax, and the TPC-H size band of each line."""
    batch["revenue"] = batch["l_extendedprice"] * (1 - batch["l_discount"]) * (1 + batch["l_tax"])
    batch["size_band"] = (batch["l_quantity"] // 10).astype("int64")
    return batch


with DAG(
    dag_id="raydata_daily_batch",
    description="Daily revenue per market segment and nation, computed on Ray",
    schedule="@daily",
    start_date=datetime(2024, 1, 1),
    catchup=False,
    max_active_runs=3,
    default_args={"retries": 2, "retry_delay": timedelta(seconds=30)},
    params={"date": Param(None, type=["null", "string"], format="date", description="Day to process")},
    user_defined_macros={"run_date": run_date},
    tags=["raydata", "example"],
) as dag:
    day = "{{ run_date(params, dag_run) }}"

    # A day without orders or lines (a holiday, or today before its files land) skips the rest of
    # the run, with the reason in the task log: there is no revenue to report or load.
    quiet_day = {"on_empty": "skip", "on_missing": "skip"}
    orders = RayDataExtractOperator(
        task_id="extract_orders",
        source=f"{SOURCE}/orders/{day}/*.csv",
        cast={"o_orderdate": "date32"},
        filter="o_totalprice > 0",
        **quiet_day,
    )
    lineitem = RayDataExtractOperator(
        task_id="extract_lineitem",
        source=f"{SOURCE}/lineitem/{day}/",
        columns=["l_orderkey", "l_linenumber", "l_quantity", "l_extendedprice", "l_discount", "l_tax", "l_returnflag"],
        cast={"l_extendedprice": "float64"},
        **quiet_day,
    )
    customer = RayDataExtractOperator(
        task_id="extract_customer",
        source=f"{SOURCE}/customer/",
        columns=["c_custkey", "c_nationkey", "c_mktsegment"],
    )
    nation = RayDataExtractOperator(
        task_id="extract_nation", source=f"{SOURCE}/nation/", columns=["n_nationkey", "n_name"]
    )
    clean = RayDataTransformOperator(
        task_id="clean_lineitem",
        input=lineitem.output,
        fn=net_revenue,
        batch_format="pandas",
        steps=[
            {"op": "drop_duplicates", "keys": ["l_orderkey", "l_linenumber"]},
            {"op": "filter", "expr": "l_returnflag != 'R'"},
        ],
    )
    revenue = RayDataTransformOperator(
        task_id="daily_revenue",
        input=clean.output,
        steps=[
            {"op": "join", "right": orders.output, "on": ["l_orderkey"], "right_on": ["o_orderkey"]},
            {"op": "join", "right": customer.output, "on": ["o_custkey"], "right_on": ["c_custkey"]},
            {"op": "join", "right": nation.output, "on": ["c_nationkey"], "right_on": ["n_nationkey"]},
            {
                "op": "aggregate",
                "by": ["o_orderdate", "c_mktsegment", "n_name"],
                "aggs": {
                    "revenue": ["sum", "revenue"],
                    "orders": ["count_distinct", "l_orderkey"],
                    "lines": ["count"],
                },
            },
        ],
    )
    checked = RayDataQualityOperator(
        task_id="quality",
        input=revenue.output,
        checks=[
            {"check": "row_count", "min": 1},
            {"check": "not_null", "column": "revenue"},
            {"check": "unique", "columns": ["o_orderdate", "c_mktsegment", "n_name"]},
            {"check": "range", "column": "revenue", "min": 0},
            {"check": "accepted_values", "column": "c_mktsegment", "values": SEGMENTS},
            # within ±50% of the previous successful run's rows; only a warning in the log
            {"check": "row_count_change", "equal_to": 1, "tolerance": 0.5, "policy": "warn"},
        ],
    )
    load = RayDataLoadOperator(
        task_id="load",
        input=checked.output,
        destination=f"{LAKE}/daily_revenue",
        partition_by=["o_orderdate"],
        mode="overwrite_partitions",
    )
    if POSTGRES_CONN_ID:
        RayDataLoadOperator(
            task_id="load_warehouse",
            input=checked.output,
            destination={"kind": "postgres", "postgres_conn_id": POSTGRES_CONN_ID, "table": POSTGRES_TABLE},
            partition_by=["o_orderdate"],
            mode="replace_partition",
        )

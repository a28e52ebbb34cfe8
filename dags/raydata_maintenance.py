"""Daily staging retention: remove stage outputs older than N days, never an active run's.

Cleans the staging area of the ``raydata_default`` connection (or $AIRFLOW_HOME/raydata/staging
with an embedded Ray), the ``_staging`` leftovers of killed loads into the example lake table,
and, when RAYDATA_POSTGRES_CONN_ID names an Airflow ``postgres`` connection, the orphaned
``_raydata_*`` staging tables there.

Settings: the ``retention_days`` param (default: env RAYDATA_RETENTION_DAYS, else 7) and the
``dry_run`` param (report only); RAYDATA_LAKE_URI as in ``raydata_daily_batch``.
"""

from __future__ import annotations

import os
from datetime import datetime

from airflow.sdk import DAG, Param

from airflow_provider_raydata.operators import RayDataStagingCleanupOperator

AIRFLOW_HOME = os.environ.get("AIRFLOW_HOME", os.path.expanduser("~/airflow"))
LAKE = os.environ.get("RAYDATA_LAKE_URI", f"{AIRFLOW_HOME}/raydata/lake")
POSTGRES_CONN_ID = os.environ.get("RAYDATA_POSTGRES_CONN_ID")
RETENTION_DAYS = float(os.environ.get("RAYDATA_RETENTION_DAYS", "7"))

with DAG(
    dag_id="raydata_maintenance",
    description="Staging retention for the Ray Data stages",
    schedule="@daily",
    start_date=datetime(2024, 1, 1),
    catchup=False,
    max_active_runs=1,  # two cleanups at once would only race each other
    params={
        "retention_days": Param(RETENTION_DAYS, type="number", exclusiveMinimum=0, description="Days to keep"),
        "dry_run": Param(False, type="boolean", description="Report what would be removed, remove nothing"),
    },
    tags=["raydata", "maintenance"],
) as dag:
    RayDataStagingCleanupOperator(
        task_id="clean_staging",
        retention_days="{{ params.retention_days }}",
        dry_run="{{ params.dry_run }}",
        lake_paths=[f"{LAKE}/daily_revenue"],
        postgres_conn_ids=[POSTGRES_CONN_ID] if POSTGRES_CONN_ID else [],
    )

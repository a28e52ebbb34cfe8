"""BigQuery on the Airflow worker: a short-lived token for the cluster's reads, and loads run as
BigQuery jobs with BigQueryHook's client (``runtime.bigquery.load``; no Ray stage)."""

from __future__ import annotations

from typing import Any

from airflow.sdk.log import mask_secret

from airflow_provider_raydata.contracts import DatasetRef, Destination, LoadResult


def bigquery_hook(conn_id: str, location: str | None = None):
    try:
        from airflow.providers.google.cloud.hooks.bigquery import BigQueryHook
    except ImportError as exc:
        raise ImportError("BigQuery needs: pip install 'airflow-provider-raydata[bigquery]'") from exc
    return BigQueryHook(gcp_conn_id=conn_id, location=location)


def bigquery_params(conn_id: str) -> dict[str, Any]:
    """A short-lived OAuth access token and the project, from BigQueryHook's credentials (the
    service-account key itself never leaves the Airflow worker)."""
    from google.auth.transport.requests import Request

    hook = bigquery_hook(conn_id)
    credentials, project = hook.get_credentials_and_project_id()
    credentials.refresh(Request())
    mask_secret(credentials.token)
    return {"token": credentials.token, "project": project}


def load_bigquery(ref: DatasetRef, destination: Destination, load_id: str) -> LoadResult:
    """Load a committed gs:// Parquet reference with BigQuery jobs (BigQueryHook's client).

    BigQuery reads the files itself: the rows pass through neither the worker nor the cluster.
    """
    from airflow_provider_raydata.runtime.bigquery.load import load_plan, publish

    hook = bigquery_hook(destination.default_conn_id, destination.location)
    plan = load_plan(ref, destination, load_id, default_project=hook.project_id)
    return publish(hook.get_client(project_id=plan.project, location=plan.location), plan)

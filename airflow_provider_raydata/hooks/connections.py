"""Airflow connections -> plain parameters for the cluster, resolved by the providers' own hooks.

The results travel to the cluster inside the stage spec (a task argument): never in a job
entrypoint, a log line or an exception. Secrets derived here are registered with Airflow's
masker so that the task log redacts them even if user code prints them.
"""

from __future__ import annotations

from dataclasses import replace

from airflow_provider_raydata.contracts import Destination, Source
from airflow_provider_raydata.hooks.bigquery import bigquery_params
from airflow_provider_raydata.hooks.postgres import postgres_params
from airflow_provider_raydata.hooks.snowflake import snowflake_params

RESOLVERS = {"postgres": postgres_params, "snowflake": snowflake_params, "bigquery": bigquery_params}


def resolve_connection(value: Source | Destination) -> Source | Destination:
    """A source or destination with the parameters of its Airflow connection (``conn``)."""
    if value.kind not in RESOLVERS:
        return value
    return replace(value, conn=RESOLVERS[value.kind](value.default_conn_id))

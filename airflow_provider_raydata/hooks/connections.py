"""Airflow connections -> plain parameters for the cluster, resolved by the providers' own hooks.

The results travel to the cluster inside the stage spec (a task argument): never in a job
entrypoint, a log line or an exception. Secrets derived here are registered with Airflow's
masker so that the task log redacts them even if user code prints them.
"""

from __future__ import annotations

from typing import Any

from airflow_provider_raydata.contracts import CONNECTION_KEYS, Destination
from airflow_provider_raydata.hooks.bigquery import bigquery_params
from airflow_provider_raydata.hooks.postgres import postgres_params
from airflow_provider_raydata.hooks.snowflake import snowflake_params

RESOLVERS = {"postgres": postgres_params, "snowflake": snowflake_params, "bigquery": bigquery_params}


def resolve_connection(spec: dict[str, Any]) -> dict[str, Any]:
    """A source dict with its ``*_conn_id`` replaced by connection parameters (``conn``)."""
    kind = spec.get("kind")
    if kind not in CONNECTION_KEYS:
        return spec
    key, default = CONNECTION_KEYS[kind]
    resolved = {k: v for k, v in spec.items() if k != key}
    resolved["conn"] = RESOLVERS[kind](spec.get(key) or default)
    return resolved


def resolve_destination(destination: Destination) -> Destination:
    """A destination with the parameters of its Airflow connection (``Destination.conn``)."""
    if destination.kind not in RESOLVERS:
        return destination
    return destination.with_conn(RESOLVERS[destination.kind](destination.default_conn_id))

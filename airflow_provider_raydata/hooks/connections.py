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


def resolve_source(source: Source) -> Source:
    """A source with the parameters of its Airflow connection (``Source.conn``)."""
    if source.kind not in RESOLVERS:
        return source
    return replace(source, conn=RESOLVERS[source.kind](source.default_conn_id))


def resolve_destination(destination: Destination) -> Destination:
    """A destination with the parameters of its Airflow connection (``Destination.conn``)."""
    if destination.kind not in RESOLVERS:
        return destination
    return destination.with_conn(RESOLVERS[destination.kind](destination.default_conn_id))

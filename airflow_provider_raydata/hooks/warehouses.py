"""Airflow connections -> plain parameters for the cluster, resolved by the providers' own hooks.

The results travel to the cluster inside the stage spec (a task argument): never in a job
entrypoint, a log line or an exception. Secrets derived here are registered with Airflow's
masker so that the task log redacts them even if user code prints them.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk.log import mask_secret

# Source/destination kinds whose dicts name an Airflow connection: kind -> (key, default id).
CONNECTION_KEYS = {
    "postgres": ("postgres_conn_id", "postgres_default"),
    "snowflake": ("snowflake_conn_id", "snowflake_default"),
    "bigquery": ("gcp_conn_id", "google_cloud_default"),
}


def postgres_hook(conn_id: str):
    try:
        from airflow.providers.postgres.hooks.postgres import PostgresHook
    except ImportError as exc:
        raise ImportError("PostgreSQL needs: pip install 'airflow-provider-raydata[postgres]'") from exc
    return PostgresHook(postgres_conn_id=conn_id)


def postgres_params(conn_id: str) -> dict[str, Any]:
    """libpq keyword arguments as PostgresHook.get_conn builds them (extras such as sslmode kept)."""
    hook = postgres_hook(conn_id)
    conn = hook.connection
    if conn.extra_dejson.get("iam"):
        login, password, port = hook.get_iam_token(conn)
    else:
        login, password, port = conn.login, conn.password, conn.port
    params: dict[str, Any] = {"host": conn.host, "port": port, "dbname": hook.database or conn.schema}
    params.update(user=login, password=password)
    ignored = {*hook.ignored_extra_options, "cursor"}
    params.update({k: v for k, v in conn.extra_dejson.items() if k not in ignored})
    if password:
        mask_secret(password)
    return {k: v for k, v in params.items() if v not in (None, "")}


PASSTHROUGH_SNOWFLAKE_OPTIONS = ("protocol", "network_timeout", "login_timeout")


def snowflake_hook(conn_id: str):
    try:
        from airflow.providers.snowflake.hooks.snowflake import SnowflakeHook
    except ImportError as exc:
        raise ImportError("Snowflake needs: pip install 'airflow-provider-raydata[snowflake]'") from exc
    return SnowflakeHook(snowflake_conn_id=conn_id)


def snowflake_params(conn_id: str) -> dict[str, Any]:
    """``snowflake.connector.connect`` keyword arguments, as SnowflakeHook.get_conn builds them
    (password, key pair, OAuth token...). The connector options the hook does not know pass
    through from the extras too: ``protocol`` (``http`` for a local stand-in such as fakesnow's
    server; the connector defaults to https), ``network_timeout`` and ``login_timeout``."""
    hook = snowflake_hook(conn_id)
    params: dict[str, Any] = dict(hook._get_conn_params())
    extra = hook.get_connection(conn_id).extra_dejson
    params.update({k: extra[k] for k in PASSTHROUGH_SNOWFLAKE_OPTIONS if extra.get(k) is not None})
    for key in ("password", "token", "proxy_password"):
        if isinstance(params.get(key), str) and params[key]:
            mask_secret(params[key])
    return {k: v for k, v in params.items() if v not in (None, "")}


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


RESOLVERS = {"postgres": postgres_params, "snowflake": snowflake_params, "bigquery": bigquery_params}


def resolve_connection(spec: dict[str, Any]) -> dict[str, Any]:
    """A source/destination dict with its ``*_conn_id`` replaced by connection parameters."""
    kind = spec.get("kind")
    if kind not in CONNECTION_KEYS:
        return spec
    key, default = CONNECTION_KEYS[kind]
    resolved = {k: v for k, v in spec.items() if k != key}
    resolved["conn"] = RESOLVERS[kind](spec.get(key) or default)
    return resolved


def postgres_watermark(conn_id: str, table: str, column: str) -> Any:
    """The newest ``column`` value in ``table`` (None when the table is absent or empty)."""
    from psycopg import sql

    from airflow_provider_raydata.runtime.postgres import table_parts

    schema, name = table_parts(table)
    with postgres_hook(conn_id).get_conn() as conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s)", [sql.Identifier(schema, name).as_string(conn)])
        if cur.fetchone()[0] is None:
            return None
        cur.execute(sql.SQL("SELECT max({}) FROM {}").format(sql.Identifier(column), sql.Identifier(schema, name)))
        return cur.fetchone()[0]


def sweep_postgres(conn_id: str, schemas: list[str], older_than: timedelta, dry_run: bool = False) -> list[str]:
    """Drop the orphaned staging tables of killed loads, through PostgresHook's own connection."""
    from airflow_provider_raydata.runtime.postgres import drop_orphaned_staging_tables

    conn = postgres_hook(conn_id).get_conn()
    try:
        return drop_orphaned_staging_tables(conn, schemas, older_than, dry_run=dry_run)
    finally:
        conn.close()


def publish_snowflake(conn_id: str, plan: dict[str, Any]) -> dict[str, Any]:
    """Run the load's publish transaction with the connection SnowflakeHook describes."""
    from airflow_provider_raydata.runtime.snowflake import connect, drop_staging_tables, publish

    with connect(snowflake_params(conn_id)) as conn:
        try:
            return publish(conn, plan)
        except BaseException:
            drop_staging_tables(conn.cursor(), plan["database"], plan["schema"], plan["load_id"])
            raise


def load_bigquery(ref: dict[str, Any] | str, destination: dict[str, Any], load_id: str) -> dict[str, Any]:
    """Load a committed gs:// Parquet reference with BigQuery jobs (BigQueryHook's client).

    BigQuery reads the files itself: the rows pass through neither the worker nor the cluster.
    """
    from airflow_provider_raydata.runtime.bigquery import load_plan, publish

    hook = bigquery_hook(destination.get("gcp_conn_id") or "google_cloud_default", destination.get("location"))
    plan = load_plan(ref, destination, load_id, default_project=hook.project_id)
    return publish(hook.get_client(project_id=plan["project"], location=plan.get("location")), plan)


PUBLISHERS = {"snowflake": publish_snowflake}


def publish_load(destination: dict[str, Any], plan: dict[str, Any]) -> dict[str, Any]:
    """Publish a plan staged on the cluster (a no-op for destinations the stage wrote itself)."""
    kind = plan.get("kind")
    if kind not in PUBLISHERS:
        return plan
    key, default = CONNECTION_KEYS[kind]
    return PUBLISHERS[kind](destination.get(key) or default, plan)


def aws_storage_options(conn_id: str) -> dict[str, Any]:
    """S3 credentials, region and endpoint (MinIO, moto, ...) from an Airflow ``aws`` connection."""
    try:
        from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
    except ImportError as exc:
        raise ImportError("s3:// with aws_conn_id needs: pip install 'airflow-provider-raydata[s3]'") from exc
    hook = AwsBaseHook(aws_conn_id=conn_id, client_type="s3")
    credentials = hook.get_credentials()
    options = {
        "aws_access_key_id": credentials.access_key,
        "aws_secret_access_key": credentials.secret_key,
        "aws_session_token": credentials.token,
        "region_name": hook.conn_config.region_name,
        "endpoint_url": hook.conn_config.get_service_endpoint_url("s3"),
    }
    for secret in (credentials.secret_key, credentials.token):
        if secret:
            mask_secret(secret)
    return {k: v for k, v in options.items() if v}


def gcs_storage_options(conn_id: str) -> dict[str, Any]:
    """A short-lived OAuth access token for gs:// from a ``google_cloud_platform`` connection."""
    try:
        from airflow.providers.google.common.hooks.base_google import GoogleBaseHook
        from google.auth.transport.requests import Request
    except ImportError as exc:
        raise ImportError("gs:// with gcp_conn_id needs: pip install 'airflow-provider-raydata[bigquery]'") from exc
    hook = GoogleBaseHook(gcp_conn_id=conn_id)
    credentials = hook.get_credentials()
    credentials.refresh(Request())
    mask_secret(credentials.token)
    options = {"gcs_access_token": credentials.token, "gcs_project": hook.project_id}
    if credentials.expiry:
        options["gcs_token_expiry"] = credentials.expiry.isoformat()
    return options

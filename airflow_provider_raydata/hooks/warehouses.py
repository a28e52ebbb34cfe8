"""Airflow connections -> plain parameters for the cluster, resolved by the providers' own hooks.

The results travel to the cluster inside the stage spec (a task argument): never in a job
entrypoint, a log line or an exception. Secrets derived here are registered with Airflow's
masker so that the task log redacts them even if user code prints them.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk.log import mask_secret

# Source/destination kinds whose dicts name an Airflow connection: kind -> (key, default id).
CONNECTION_KEYS = {"postgres": ("postgres_conn_id", "postgres_default")}


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


def resolve_connection(spec: dict[str, Any]) -> dict[str, Any]:
    """A source/destination dict with its ``*_conn_id`` replaced by connection parameters."""
    kind = spec.get("kind")
    if kind not in CONNECTION_KEYS:
        return spec
    key, default = CONNECTION_KEYS[kind]
    resolved = {k: v for k, v in spec.items() if k != key}
    resolved["conn"] = postgres_params(spec.get(key) or default)
    return resolved


def publish_postgres(conn_id: str, plan: dict[str, Any]) -> dict[str, Any]:
    """Run the load's publish transaction through PostgresHook's own connection."""
    from airflow_provider_raydata.runtime.postgres import drop_staging_tables, publish

    conn = postgres_hook(conn_id).get_conn()
    try:
        return publish(conn, plan)
    except BaseException:
        with conn.transaction(), conn.cursor() as cur:  # the rolled-back load's staged rows
            drop_staging_tables(cur, plan["schema"], plan["load_id"])
        raise
    finally:
        conn.close()


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

"""Snowflake on the Airflow worker: SnowflakeHook's connection as plain parameters for the
cluster, and the publish of a load the cluster staged (``runtime.snowflake.publish``)."""

from __future__ import annotations

from typing import Any

from airflow.sdk.log import mask_secret

from airflow_provider_raydata.contracts import LoadResult, SnowflakePlan

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


def publish_snowflake(conn_id: str, plan: SnowflakePlan) -> LoadResult:
    """Run the load's publish transaction with the connection SnowflakeHook describes."""
    from airflow_provider_raydata.runtime.snowflake.common import connect, drop_staging_tables
    from airflow_provider_raydata.runtime.snowflake.publish import publish

    with connect(snowflake_params(conn_id)) as conn:
        try:
            return publish(conn, plan)
        except BaseException:
            drop_staging_tables(conn.cursor(), plan.database, plan.schema, plan.load_id)
            raise

"""PostgreSQL on the Airflow worker: PostgresHook's connection as plain parameters for the
cluster, the incremental watermark, and the sweep of orphaned staging tables."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk.log import mask_secret


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


def postgres_watermark(conn_id: str, table: str, column: str) -> Any:
    """The newest ``column`` value in ``table`` (None when the table is absent or empty)."""
    from psycopg import sql

    from airflow_provider_raydata.runtime.postgres.common import table_parts

    schema, name = table_parts(table)
    with postgres_hook(conn_id).get_conn() as conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s)", [sql.Identifier(schema, name).as_string(conn)])
        if cur.fetchone()[0] is None:
            return None
        cur.execute(sql.SQL("SELECT max({}) FROM {}").format(sql.Identifier(column), sql.Identifier(schema, name)))
        return cur.fetchone()[0]


def sweep_postgres(conn_id: str, schemas: list[str], older_than: timedelta, dry_run: bool = False) -> list[str]:
    """Drop the orphaned staging tables of killed loads, through PostgresHook's own connection."""
    from airflow_provider_raydata.runtime.postgres.sweep import drop_orphaned_staging_tables

    conn = postgres_hook(conn_id).get_conn()
    try:
        return drop_orphaned_staging_tables(conn, schemas, older_than, dry_run=dry_run)
    finally:
        conn.close()

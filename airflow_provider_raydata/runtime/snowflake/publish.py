"""Publish a staged Snowflake load (on the Airflow worker, ``hooks.snowflake``) in one transaction."""

from __future__ import annotations

from dataclasses import replace

from ...contracts import DataError, LoadResult, SnowflakePlan, UpsertRule
from ..upsert import merge_statement, repeated_key_message, repeated_key_query
from .common import LEDGER, column_list, qualified, quote, table_columns


def publish(conn, plan: SnowflakePlan) -> LoadResult:
    """Move the staged rows into the target in one transaction (conn: a qmark connector connection)."""
    database, schema, mode = plan.database, plan.schema, plan.mode
    target = qualified(database, schema, plan.table)
    staging = qualified(database, schema, plan.staging_table)
    ledger = qualified(database, schema, LEDGER)
    columns = column_list(plan.columns)
    result = LoadResult(plan.destination, mode, plan.rows_written, plan.load_id)
    cur = conn.cursor()
    if table_columns(cur, database, schema, plan.staging_table) is None:
        raise RuntimeError(f"Staging table {schema}.{plan.staging_table} is gone: the load must be rerun")
    if mode == "upsert" and not plan.upsert.sequence_by:
        _check_no_repeated_key(cur, plan.upsert, staging)  # before anything is created or changed
    # DDL commits implicitly: create what the transaction needs before it begins.
    cur.execute(
        f"CREATE TABLE IF NOT EXISTS {ledger} (target VARCHAR, load_id VARCHAR, mode VARCHAR, rows_written NUMBER,"
        " loaded_at TIMESTAMP_TZ DEFAULT CURRENT_TIMESTAMP())"
    )
    if table_columns(cur, database, schema, plan.table) is None:
        cur.execute(f"CREATE TABLE IF NOT EXISTS {target} AS SELECT {columns} FROM {staging} LIMIT 0")
    record = [plan.destination, plan.load_id, mode, plan.rows_written]
    if mode == "upsert":
        # One MERGE is atomic by itself, and replaying it gives the same table: it needs no ledger
        # check, so it runs as its own transaction (fakesnow also cannot MERGE inside BEGIN).
        deleted = _merge(cur, plan, target, staging)
        _record(cur, ledger, record)
        cur.execute(f"DROP TABLE IF EXISTS {staging}")
        return replace(result, rows_deleted=deleted)
    cur.execute("BEGIN")
    try:
        cur.execute(f"SELECT mode FROM {ledger} WHERE target = ? AND load_id = ?", record[:2])
        if mode == "append" and any(row[0] == "append" for row in cur.fetchall()):
            cur.execute("ROLLBACK")  # this run's append was already published: never twice
            cur.execute(f"DROP TABLE IF EXISTS {staging}")
            return replace(result, skipped=True, rows_written=0)
        _record(cur, ledger, record)
        if mode == "overwrite":
            cur.execute(f"INSERT OVERWRITE INTO {target} ({columns}) SELECT {columns} FROM {staging}")
        else:
            if mode == "replace_partition":
                keys = plan.partition_by
                match = " AND ".join(f"t.{quote(k)} IS NOT DISTINCT FROM s.{quote(k)}" for k in keys)
                cur.execute(
                    f"DELETE FROM {target} AS t USING (SELECT DISTINCT {column_list(keys)} FROM {staging}) AS s"
                    f" WHERE {match}"
                )
                deleted = cur.rowcount
                cur.execute(f"SELECT DISTINCT {column_list(keys)} FROM {staging}")
                partitions = sorted("/".join(map(str, row)) for row in cur.fetchall())
                result = replace(result, rows_deleted=deleted, partitions=partitions)
            cur.execute(f"INSERT INTO {target} ({columns}) SELECT {columns} FROM {staging}")
        cur.execute("COMMIT")
    except BaseException:
        cur.execute("ROLLBACK")
        raise
    cur.execute(f"DROP TABLE IF EXISTS {staging}")
    return result


def _record(cur, ledger: str, record: list) -> None:
    cur.execute(f"DELETE FROM {ledger} WHERE target = ? AND load_id = ?", record[:2])
    cur.execute(f"INSERT INTO {ledger} (target, load_id, mode, rows_written) VALUES (?, ?, ?, ?)", record)


def _merge(cur, plan: SnowflakePlan, target: str, staging: str) -> int:
    """``runtime.upsert``'s rules as one MERGE; returns the number of rows deleted."""
    cur.execute(merge_statement(quote, target, staging, plan.columns, plan.upsert))
    counts = dict(zip([d.name.lower() for d in cur.description], cur.fetchone() or (), strict=False))
    return int(counts.get("number of rows deleted") or 0)


def _check_no_repeated_key(cur, rule: UpsertRule, staging: str) -> None:
    """``runtime.upsert``'s rule 1 on the staged rows."""
    cur.execute(repeated_key_query(quote, staging, rule))
    repeated = cur.fetchone()
    if repeated is not None:
        raise DataError(repeated_key_message(rule, dict(zip(rule.keys, repeated, strict=True))))

"""Shared by the PostgreSQL modules (cluster and worker): table names, identifiers, type mapping, the load ledger and
the staging tables' names."""

from __future__ import annotations

import json
from collections.abc import Iterable
from contextlib import contextmanager
from typing import Any

import pyarrow as pa
from psycopg import errors, sql

from ...contracts import DATA_SQLSTATE_CLASSES, DataError

# The table recording published loads (target, load id), in the target's schema: a retried
# append finds its own load there and is skipped.
LEDGER = "_raydata_loads"


# Staging tables: _raydata_{load_id}_{token} (stage), _raydata_old_{token} (an overwrite's swap).
STAGING_PREFIX = "_raydata_"


def _sql():  # psycopg is an optional extra: import it where it is used

    return sql


def table_parts(name: str | dict) -> tuple[str, str]:
    """``"schema.table"``, ``"table"`` or ``{"schema": ..., "table": ...}`` -> (schema, table).

    The parts are always quoted as identifiers (psycopg.sql.Identifier), never pasted into SQL.
    """
    if isinstance(name, dict):
        schema, table = name.get("schema") or "public", name["table"]
    else:
        schema, _, table = name.rpartition(".") if "." in name else ("public", "", name)
    if not table or not schema:
        raise DataError(f"Invalid table name {name!r}: use 'schema.table' or 'table'")
    return schema, table


def idents(names: Iterable[str]):
    """A comma-separated list of quoted identifiers."""
    return sql.SQL(", ").join(map(sql.Identifier, names))


def connect(params: dict[str, Any]):
    import psycopg

    return psycopg.connect(**params)


def explained(exc: BaseException, target: str) -> BaseException:
    """A PostgreSQL error about the data (SQLSTATE class 22/23/42) as a ``DataError`` that keeps
    the server's detail (the column, its precision, the row of the COPY): psycopg's errors lose
    their SQLSTATE on their way out of a Ray task, and with it the fact that no retry helps."""
    from psycopg import Error

    sqlstate = getattr(exc, "sqlstate", None)
    if not isinstance(exc, Error) or not sqlstate or sqlstate[:2] not in DATA_SQLSTATE_CLASSES:
        return exc
    diag = exc.diag
    parts = [diag.message_detail, diag.message_hint, diag.context and diag.context.strip()]
    detail = "; ".join(p for p in parts if p)
    return DataError(
        f"Loading {target} failed: {type(exc).__name__}: {diag.message_primary}" + (f" ({detail})" if detail else "")
    )


def pg_type(field: pa.Field) -> str:
    t = field.type
    if pa.types.is_dictionary(t):
        return pg_type(field.with_type(t.value_type))
    if pa.types.is_boolean(t):
        return "boolean"
    if pa.types.is_int8(t) or pa.types.is_int16(t) or pa.types.is_uint8(t):
        return "smallint"
    if pa.types.is_int32(t) or pa.types.is_uint16(t):
        return "integer"
    if pa.types.is_int64(t) or pa.types.is_uint32(t):
        return "bigint"
    if pa.types.is_uint64(t):
        return "numeric(20, 0)"
    if pa.types.is_float16(t) or pa.types.is_float32(t):
        return "real"
    if pa.types.is_float64(t):
        return "double precision"
    if pa.types.is_decimal(t):
        return f"numeric({t.precision}, {t.scale})"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "text"
    if pa.types.is_date(t):
        return "date"
    if pa.types.is_timestamp(t):
        return "timestamp with time zone" if t.tz else "timestamp without time zone"
    if pa.types.is_time(t):
        return "time"
    raise DataError(f"Column {field.name!r}: Arrow type {t} has no PostgreSQL COPY mapping; cast it first")


def table_columns(cur, schema: str, table: str) -> list[str] | None:
    """The target's columns in order, or None when the table does not exist."""
    cur.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped "
        "ORDER BY attnum",
        [sql.Identifier(schema, table).as_string()],
    )
    names = [row[0] for row in cur.fetchall()]
    if names:
        return names
    cur.execute("SELECT to_regclass(%s)", [sql.Identifier(schema, table).as_string()])
    return None if cur.fetchone()[0] is None else []


def ensure_ledger(cur, schema: str) -> None:
    """The table recording published loads (target, load id), in the target's schema."""
    ledger = sql.Identifier(schema, LEDGER)
    cur.execute("SELECT to_regclass(%s)", [ledger.as_string(cur.connection)])
    if cur.fetchone()[0] is not None:
        return
    try:
        # A savepoint: CREATE TABLE IF NOT EXISTS is not safe against a concurrent first load, which
        # can create the table between the check and the insert (a unique violation on pg_type).
        with cur.connection.transaction():
            cur.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} (target text, load_id text, mode text, rows bigint,"
                    " loaded_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (target, load_id))"
                ).format(ledger)
            )
    except (errors.UniqueViolation, errors.DuplicateTable):
        pass  # the other load created it


def drop_staging_tables(cur, schema: str, load_id: str) -> None:
    """Drop what earlier tries of this load left behind (a killed task never published them)."""
    cur.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = %s AND tablename LIKE %s",
        [schema, f"{STAGING_PREFIX}{load_id}_%"],
    )
    for (name,) in cur.fetchall():
        cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(schema, name)))


def mark_staging_table(cur, staging, load_id: str) -> None:
    """Record when a staging table was created (database clock) for the orphan sweep."""
    cur.execute("SELECT now()")
    note = json.dumps({"raydata_staging": True, "load_id": load_id, "created_at": cur.fetchone()[0].isoformat()})
    cur.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(staging, sql.Literal(note)))


def definition(columns: list[str], column_types: list[str]):
    """A table's column list from the Arrow schema's PostgreSQL types."""
    pairs = zip(columns, column_types, strict=True)
    return sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(kind)) for name, kind in pairs)


def has_rows(cur, table) -> bool:
    cur.execute(sql.SQL("SELECT EXISTS (SELECT FROM {})").format(table))
    return cur.fetchone()[0]


@contextmanager
def named_duplicates(target: str):
    """A unique index build that meets a repeated key fails the load (without retries), naming the
    key; the index's own name, a staging table's, would mean nothing to the user."""

    try:
        yield
    except errors.UniqueViolation as exc:
        raise DataError(f"{target} has a unique index that this load breaks: {exc.diag.message_detail}") from None

"""Shared by the Snowflake modules (cluster and worker): identifiers, table names, the ledger and
staging tables."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ...contracts import DataError

LEDGER = "_raydata_loads"


INTERNAL_STAGE = "_raydata_stage"


STAGING_PREFIX = "_raydata_"


def quote(name: str) -> str:
    """A Snowflake identifier, double-quoted (so case-sensitive), embedded quotes doubled."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise DataError(f"Invalid Snowflake identifier {name!r}")
    return '"' + name.replace('"', '""') + '"'


def qualified(*parts: str) -> str:
    return ".".join(quote(p) for p in parts)


def column_list(names: Iterable[str], prefix: str = "") -> str:
    return ", ".join(prefix + quote(n) for n in names)


def table_parts(name: str | dict, conn: dict[str, Any]) -> tuple[str, str, str]:
    """``"db.schema.table"``, ``"schema.table"``, ``"table"`` or a dict -> (database, schema, table).

    Missing parts come from the connection's ``database``/``schema``. Use the dict form for
    names that contain dots.
    """
    if isinstance(name, dict):
        parts = [name.get("database"), name.get("schema"), name.get("table")]
    else:
        parts = [None, None, *name.split(".")][-3:] if name.count(".") <= 2 else []
    if len(parts) != 3:
        raise DataError(f"Invalid table name {name!r}: use 'database.schema.table' or a dict")
    database, schema, table = parts
    database, schema = database or conn.get("database"), schema or conn.get("schema")
    if not (database and schema and table):
        raise DataError(f"Table {name!r} needs a database and schema (in the name or the connection)")
    return database, schema, table


def connect(params: dict[str, Any], paramstyle: str = "qmark"):
    import snowflake.connector

    return snowflake.connector.connect(**params, paramstyle=paramstyle)


def table_columns(cur, database: str, schema: str, table: str) -> list[str] | None:
    """The table's columns in order, or None when it does not exist."""
    cur.execute(
        f"SELECT column_name FROM {quote(database)}.information_schema.columns"
        " WHERE table_schema = ? AND table_name = ? ORDER BY ordinal_position",
        [schema, table],
    )
    names = [row[0] for row in cur.fetchall()]
    return names or None


def drop_staging_tables(cur, database: str, schema: str, load_id: str) -> None:
    """Drop what earlier tries of this load left behind (a killed task never published them)."""
    cur.execute(
        f"SELECT table_name FROM {quote(database)}.information_schema.tables"
        " WHERE table_schema = ? AND startswith(table_name, ?)",
        [schema, f"{STAGING_PREFIX}{load_id}_"],
    )
    for (name,) in cur.fetchall():
        cur.execute(f"DROP TABLE IF EXISTS {qualified(database, schema, name)}")

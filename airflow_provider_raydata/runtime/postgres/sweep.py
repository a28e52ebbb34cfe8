"""Retention (on the Airflow worker, through ``hooks.postgres``): drop the staging tables that
killed loads left behind."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from datetime import datetime, timedelta

from psycopg import Rollback, errors, sql

from .common import LEDGER

# Only names ``stage`` creates: ``_raydata_{load_id}_{token}`` and publish's swap's
# ``_raydata_old_{token}`` (never the ``_raydata_loads`` ledger).
STAGING_NAME = re.compile(r"_raydata_(?:[0-9a-f]+|old)_[0-9a-f]{8}")


def drop_orphaned_staging_tables(
    conn, schemas: Iterable[str], older_than: timedelta, dry_run: bool = False
) -> list[str]:
    """Drop staging tables that killed loads left behind; return their ``schema.table`` names.

    A staging table is old when the creation time ``copy_to_staging`` noted in its comment is before
    ``now() - older_than`` (database clock); a table without that note (made before notes
    existed, or a retired ``_raydata_old_*`` table) counts as old. Either way it is dropped only
    if no other session holds any lock on it: ``LOCK TABLE ... NOWAIT`` fails on a table that a
    COPY, a publish or any open transaction uses, and such a table is skipped, never waited for.
    ``conn``: a psycopg 3 connection; each table is dropped in its own transaction.
    """

    with conn.transaction(), conn.cursor() as cur:
        cur.execute(
            "SELECT n.nspname, c.relname, obj_description(c.oid, 'pg_class'), now() FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.relkind IN ('r', 'p') AND n.nspname = ANY(%s) ORDER BY 1, 2",
            [list(schemas)],
        )
        found = [row for row in cur.fetchall() if STAGING_NAME.fullmatch(row[1]) and row[1] != LEDGER]
    dropped = []
    for schema, name, comment, now in found:
        created = _created_at(comment)
        if created is not None and created >= now - older_than:
            continue
        table = sql.Identifier(schema, name)
        try:
            with conn.transaction(), conn.cursor() as cur:
                cur.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE NOWAIT").format(table))
                if dry_run:
                    raise Rollback()
                cur.execute(sql.SQL("DROP TABLE {}").format(table))
        except (errors.LockNotAvailable, errors.UndefinedTable):
            continue  # in use (a running load or publish), or gone meanwhile
        dropped.append(f"{schema}.{name}")
    return dropped


def _created_at(comment: str | None) -> datetime | None:
    """The creation time in a staging table's comment, or None without one."""
    try:
        note = json.loads(comment or "")
        return datetime.fromisoformat(note["created_at"]) if note.get("raydata_staging") else None
    except (ValueError, TypeError, KeyError, AttributeError):
        return None

"""Publish a staged load (on the cluster): one transaction, in the caller's connection, moves
the rows into the target by mode. Append and replace_partition COPY the committed files straight
into it (a staging table would cost a second copy of every row); overwrite swaps the staging
table in; upsert inserts from it ``ON CONFLICT`` (``upsert``)."""

from __future__ import annotations

import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
from psycopg import errors, sql

from ...contracts import DataError, LoadResult, PostgresPlan
from ..storage import filesystem_for
from .common import LEDGER, STAGING_PREFIX, definition, ensure_ledger, has_rows, idents, named_duplicates, table_columns
from .staging import copy_files
from .upsert import check_conflict_target, on_conflict, still_first_load, upsert_rows


def publish(conn, plan: PostgresPlan, storage: dict | None = None) -> LoadResult:
    """Move the staged rows (or, for append and replace_partition, the committed Parquet files,
    read with ``storage``) into the target, in the caller's transaction on ``conn`` (psycopg 3,
    not in autocommit mode): the caller commits or rolls back."""
    started = time.perf_counter()
    result = _publish(conn, plan, storage)
    return LoadResult(**result, publish_seconds=round(time.perf_counter() - started, 3))


def _publish(conn, plan: PostgresPlan, storage: dict | None) -> dict:
    schema, table, mode = plan.schema, plan.table, plan.mode
    target, columns = sql.Identifier(schema, table), idents(plan.columns)
    staging = sql.Identifier(schema, plan.staging_table) if plan.staging_table else None
    ledger = sql.Identifier(schema, LEDGER)
    result = {
        "destination": plan.destination,
        "mode": mode,
        "rows_written": plan.rows_written,
        "load_id": plan.load_id,
        "copy_seconds": plan.copy_seconds,
        "index_seconds": plan.index_seconds,
    }
    with conn.cursor() as cur:
        # One publisher per table at a time (a retry may overlap a killed try's orphan stage).
        cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [plan.destination])
        if staging is not None:
            cur.execute("SELECT to_regclass(%s)", [staging.as_string(conn)])
            if cur.fetchone()[0] is None:
                raise RuntimeError(f"Staging table {schema}.{plan.staging_table} is gone: the load must be rerun")
        ensure_ledger(cur, schema)
        cur.execute(
            sql.SQL(
                "INSERT INTO {} (target, load_id, mode, rows) VALUES (%s, %s, %s, %s) ON CONFLICT (target, load_id)"
                " DO UPDATE SET rows = EXCLUDED.rows, mode = EXCLUDED.mode, loaded_at = now()"
                " WHERE {}.mode <> 'append' OR EXCLUDED.mode <> 'append' RETURNING 1"
            ).format(ledger, sql.Identifier(LEDGER)),
            [plan.destination, plan.load_id, mode, plan.rows_written],
        )
        if cur.fetchone() is None:  # this run's append was already published: never twice
            if staging is not None:
                cur.execute(sql.SQL("DROP TABLE {}").format(staging))
            return {**result, "skipped": True, "rows_written": 0}
        exists = table_columns(cur, schema, table) is not None
        if mode == "overwrite" or (plan.first_load and still_first_load(cur, plan, target, exists)):
            _swap(cur, conn, target, staging, schema, table, exists, columns)
            if mode == "upsert" and not exists:  # built once, after the COPY, and named after the table
                with named_duplicates(plan.destination):
                    cur.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY ({})").format(target, idents(plan.upsert.keys)))
            return result
        if not exists:
            if plan.column_types is None:
                raise RuntimeError(f"Table {plan.destination} was dropped while this load ran: rerun it")
            keys = plan.upsert.keys if mode == "upsert" else []
            primary = sql.SQL(", PRIMARY KEY ({})").format(idents(keys)) if keys else sql.SQL("")
            cur.execute(
                sql.SQL("CREATE TABLE {} ({}{})").format(target, definition(plan.columns, plan.column_types), primary)
            )
        if staging is None:  # append, replace_partition: one COPY straight into the target
            fs = filesystem_for(plan.uri, storage)[0]
            if mode == "replace_partition":  # a table created just now has nothing to delete
                deleted, result["partitions"] = _delete_partitions(cur, fs, plan, target, delete=exists)
                result["rows_deleted"] = deleted
            started = time.perf_counter()
            rows = copy_files(cur, fs, [(path, None) for path in plan.files], (schema, table), plan.columns)
            result.update(rows_written=rows, copy_seconds=round(time.perf_counter() - started, 3))
            cur.execute(
                sql.SQL("UPDATE {} SET rows = %s WHERE target = %s AND load_id = %s").format(ledger),
                [rows, plan.destination, plan.load_id],
            )
            return result
        check_conflict_target(cur, plan, target, staging)
        insert = sql.SQL("INSERT INTO {} AS t ({}) ").format(target, columns)
        rows, result["rows_deleted"] = upsert_rows(cur, plan, target, staging, columns)
        # Into an empty table an upsert is an insert: ON CONFLICT's per-row conflict check made
        # it ~2.5x slower (6M rows: 39-45 s, against 16 s).
        cur.execute(insert + rows + (on_conflict(plan) if has_rows(cur, target) else sql.SQL("")))
        cur.execute(sql.SQL("DROP TABLE {}").format(staging))
    return result


def _delete_partitions(cur, fs, plan, target, delete: bool = True) -> tuple[int, list[str]]:
    """Delete the target's rows whose partition key is one of this load's (read from its files,
    distinct per file first); return the count and the partitions."""
    keys = plan.partition_by
    tables = [pq.read_table(path, columns=keys, filesystem=fs).group_by(keys).aggregate([]) for path in plan.files]
    found = pa.concat_tables(tables).group_by(keys).aggregate([]) if tables else None
    if found is None or found.num_rows == 0:
        return 0, []
    values = [found.column(k).to_pylist() for k in keys]
    partitions = sorted("/".join(map(str, row)) for row in zip(*values, strict=True))
    if not delete:
        return 0, partitions
    # Cast to the target's own column types (Parquet's may differ: timestamptz vs timestamp, ...).
    cur.execute(
        "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = to_regclass(%s)"
        " AND attname = ANY(%s) AND NOT attisdropped",
        [target.as_string(cur), keys],
    )
    types = dict(cur.fetchall())
    tests = []
    for key, column in zip(keys, values, strict=True):
        # "=" joins by hash; NULL partitions need IS NOT DISTINCT FROM, which compares row by row.
        test = "t.{0} IS NOT DISTINCT FROM s.{0}" if None in column else "t.{0} = s.{0}"
        tests.append(sql.SQL(test).format(sql.Identifier(key)))
    arrays = sql.SQL(", ").join(sql.SQL("%s::{}[]").format(sql.SQL(types[k])) for k in keys)
    cur.execute(
        sql.SQL("DELETE FROM {} AS t USING unnest({}) AS s({}) WHERE {}").format(
            target, arrays, idents(keys), sql.SQL(" AND ").join(tests)
        ),
        values,
    )
    return cur.rowcount, partitions


def _swap(cur, conn, target, staging, schema, table, exists, columns):
    """Overwrite: the staged table becomes the target (a rename, no second copy of the rows),
    with the old table's owner and grants.

    When the swap could not carry the old table over whole (a partitioned table, triggers,
    row-level security, column grants, a publication, foreign keys to other tables, storage
    parameters: ``LIKE ... INCLUDING ALL`` copies none of them), other objects depend on it
    (views, owned sequences) or the loading role may not replace it (not its owner), its rows
    are replaced in place instead (TRUNCATE + INSERT).
    """

    if not exists:
        cur.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(staging, sql.Identifier(table)))
        cur.execute(sql.SQL("COMMENT ON TABLE {} IS NULL").format(target))  # not the staging table's note
        return
    cur.execute(
        "SELECT obj_description(c.oid, 'pg_class'), pg_get_userbyid(c.relowner), current_user,"
        " c.relkind <> 'r' OR c.relrowsecurity"
        " OR EXISTS (SELECT FROM pg_trigger WHERE tgrelid = c.oid AND NOT tgisinternal)"
        " OR EXISTS (SELECT FROM pg_attribute WHERE attrelid = c.oid AND attacl IS NOT NULL)"
        " OR EXISTS (SELECT FROM pg_publication_rel WHERE prrelid = c.oid)"
        " OR EXISTS (SELECT FROM pg_constraint WHERE conrelid = c.oid AND contype = 'f')"
        " OR c.reloptions IS NOT NULL"
        " FROM pg_class c WHERE c.oid = to_regclass(%s)",
        [target.as_string(conn)],
    )
    comment, owner, loader, keep_in_place = cur.fetchone()
    if keep_in_place:
        _replace_in_place(cur, target, staging, columns)
        return
    retired = f"{STAGING_PREFIX}old_{uuid.uuid4().hex[:8]}"
    try:
        with conn.transaction():  # a savepoint
            _copy_grants(cur, conn, target, staging)
            renames = _index_renames(cur, conn, target, staging)
            if owner != loader:
                cur.execute(sql.SQL("ALTER TABLE {} OWNER TO {}").format(staging, sql.Identifier(owner)))
            cur.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(target, sql.Identifier(retired)))
            cur.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(staging, sql.Identifier(table)))
            cur.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(target, sql.Literal(comment)))
            cur.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(schema, retired)))
            for staged_name, name in renames:  # the old names are free now
                cur.execute(
                    sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                        sql.Identifier(schema, staged_name), sql.Identifier(name)
                    )
                )
    except (errors.DependentObjectsStillExist, errors.InsufficientPrivilege):  # e.g. not the table's owner
        _replace_in_place(cur, target, staging, columns)


def _index_renames(cur, conn, target, staging) -> list[tuple[str, str]]:
    """(staging index, target index) name pairs: LIKE ... INCLUDING ALL names the copied indexes
    (and so their constraints) after the staging table. It copies them in the target's index
    order; if the two lists do not match column for column, the generated names are kept."""
    query = (  # columns by name: a table with dropped columns numbers them differently from its copy
        "SELECT c.relname, i.indisunique, i.indisprimary, i.indclass::text, ARRAY(SELECT a.attname"
        " FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n) LEFT JOIN pg_attribute a"
        " ON a.attrelid = i.indrelid AND a.attnum = k.attnum ORDER BY k.n) FROM pg_index i"
        " JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = to_regclass(%s) ORDER BY i.indexrelid"
    )
    old = cur.execute(query, [target.as_string(conn)]).fetchall()
    new = cur.execute(query, [staging.as_string(conn)]).fetchall()
    if [row[1:] for row in old] != [row[1:] for row in new]:
        return []
    return [(staged[0], kept[0]) for staged, kept in zip(new, old, strict=True)]


def _copy_grants(cur, conn, source, target) -> None:
    """GRANT on ``target`` what is granted on ``source`` (LIKE ... INCLUDING ALL copies no grants)."""
    cur.execute(
        "SELECT a.grantee = 0, r.rolname, a.privilege_type, a.is_grantable"
        " FROM pg_class c CROSS JOIN aclexplode(c.relacl) AS a LEFT JOIN pg_roles r ON r.oid = a.grantee"
        " WHERE c.oid = to_regclass(%s) AND a.grantee <> c.relowner",
        [source.as_string(conn)],
    )
    for public, role, privilege, grantable in cur.fetchall():
        grantee = sql.SQL("PUBLIC") if public else sql.Identifier(role)
        option = sql.SQL(" WITH GRANT OPTION") if grantable else sql.SQL("")
        # privilege_type is one of the catalog's privilege keywords (SELECT, INSERT, ...).
        cur.execute(sql.SQL("GRANT {} ON {} TO {}{}").format(sql.SQL(privilege), target, grantee, option))


def _replace_in_place(cur, target, staging, columns) -> None:

    try:
        if has_rows(cur, target):  # an empty table (a first upsert) needs none, even if referenced
            cur.execute(sql.SQL("TRUNCATE {}").format(target))
    except errors.FeatureNotSupported as exc:  # emptying it would break other tables' foreign keys
        raise DataError(f"overwrite cannot replace {target.as_string(cur)}: {exc.diag.message_primary}") from None
    cur.execute(sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {}").format(target, columns, columns, staging))
    cur.execute(sql.SQL("DROP TABLE {}").format(staging))

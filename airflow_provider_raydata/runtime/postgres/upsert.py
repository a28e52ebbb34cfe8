"""The PostgreSQL upsert: ``runtime.upsert``'s rules as SQL. The latest staged row per key
(``DISTINCT ON``), deletes of flagged keys, then ``INSERT ... ON CONFLICT (keys) DO UPDATE``
guarded so that an older row never replaces a newer one. A first load into a missing or empty
table is staged and swapped in like an overwrite (``publish``)."""

from __future__ import annotations

from psycopg import errors, sql

from ...contracts import DataError, PostgresPlan
from .common import has_rows, idents


def is_first_load(plan: PostgresPlan) -> bool:
    """Whether an upsert, if its target is missing or empty, can be staged like an overwrite and
    swapped in: every row is inserted as it is (no version to pick, no delete to apply)."""
    return plan.mode == "upsert" and plan.upsert.first_load_is_insert


def still_first_load(cur, plan: PostgresPlan, target, exists: bool) -> bool:
    """Whether the target is still as it was when the first load was staged (missing, or empty
    with the same definition); otherwise the staged rows are upserted into it."""
    staged_like_target = plan.column_types is None  # the target existed then
    if not exists:
        return not staged_like_target
    # Writers outside this provider (they take no advisory lock) wait from here until the commit.
    cur.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(target))
    return staged_like_target and not has_rows(cur, target)


def check_conflict_target(cur, plan: PostgresPlan, target, source) -> None:
    """Fail unless the target has the unique index that ``ON CONFLICT (keys)`` needs. The statement
    is only planned (EXPLAIN): nothing is inserted and no trigger fires."""

    columns = idents(plan.columns)
    try:
        cur.execute(
            sql.SQL("EXPLAIN INSERT INTO {} AS t ({}) SELECT {} FROM {}").format(target, columns, columns, source)
            + on_conflict(plan)
        )
    except errors.InvalidColumnReference as exc:
        raise DataError(
            f"upsert into {plan.destination} on ({', '.join(plan.upsert.keys)}) needs a primary key or unique "
            "index on exactly those columns"
        ) from exc


def upsert_rows(cur, plan: PostgresPlan, target, staging, columns):
    """Rows to upsert (the latest per key when ``sequence_by`` is set); deletes flagged keys."""
    rule = plan.upsert
    keys = idents(rule.keys)
    rows = sql.SQL("SELECT {} FROM {}").format(columns, staging)
    if rule.sequence_by:
        rows = sql.SQL("SELECT DISTINCT ON ({}) {} FROM {} ORDER BY {}, {} DESC").format(
            keys, columns, staging, keys, sql.Identifier(rule.sequence_by)
        )
    deleted = 0
    flag = rule.delete_column
    if flag:
        latest = sql.SQL("({}) AS s").format(rows)
        match = sql.SQL(" AND ").join(sql.SQL("t.{0} = s.{0}").format(sql.Identifier(k)) for k in rule.keys)
        if rule.sequence_by:  # a delete older than the stored row does not apply
            match += sql.SQL(" AND (t.{0} <= s.{0}) IS NOT FALSE").format(sql.Identifier(rule.sequence_by))
        cur.execute(
            sql.SQL("DELETE FROM {} AS t USING {} WHERE {} AND s.{}").format(
                target, latest, match, sql.Identifier(flag)
            )
        )
        deleted = cur.rowcount
        rows = sql.SQL("SELECT {} FROM ({}) AS s WHERE s.{} IS NOT TRUE").format(columns, rows, sql.Identifier(flag))
    return rows, deleted


def on_conflict(plan: PostgresPlan):
    if plan.mode != "upsert":
        return sql.SQL("")
    updates = [c for c in plan.columns if c not in plan.upsert.keys]
    action = (
        sql.SQL("DO UPDATE SET {}").format(
            sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in updates)
        )
        if updates
        else sql.SQL("DO NOTHING")
    )
    if updates and plan.upsert.sequence_by:
        # An older version never replaces a newer one: loads (backfills, overlapping runs) may
        # publish in any order and still leave the latest row per key.
        action += sql.SQL(" WHERE (t.{0} <= EXCLUDED.{0}) IS NOT FALSE").format(sql.Identifier(plan.upsert.sequence_by))
    return sql.SQL(" ON CONFLICT ({}) ").format(idents(plan.upsert.keys)) + action

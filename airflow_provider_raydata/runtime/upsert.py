"""The one upsert semantics. Every destination implements exactly these rules, and
``tests/integration/test_upsert_matrix.py`` runs the same scenarios against all of them.

An upsert merges a load into its target by ``UpsertRule.keys``:

1. **Keys identify a row.** Without ``sequence_by``, a load that repeats a key fails as a data
   error (no retry), naming the key, and changes nothing: which of its rows would win?
2. **The latest version wins.** With ``sequence_by``, the load's row with the highest value per
   key is its version of that key; a stored row with a higher value is kept (**an older row
   never replaces a newer one**), so loads may publish in any order (backfills, overlapping
   runs) and the table still ends with the latest row per key. Equal values: the load wins.
   Without ``sequence_by``, the load's row replaces the stored one.
3. **Deletes.** With ``delete_column``, a key whose winning row (rule 2) has it true is removed
   from the target (a flagged key the target lacks inserts nothing); a stored row newer than
   the delete is kept. Without ``delete_column`` a flag column is data like any other.
4. **First load.** Into a missing or empty target the result is the same as into a table with
   no matching keys (PostgreSQL creates a missing table with the keys as its primary key).
5. **Columns.** A key's other columns all come from the winning row; ``sequence_by`` values
   must not be null (databases order nulls differently; the result is then not specified).

Where each dialect implements them:
- Parquet lake: ``merge_latest`` below (pyarrow), called by ``runtime.lake``;
- PostgreSQL: ``runtime.postgres.upsert`` (``INSERT ... ON CONFLICT DO UPDATE WHERE``);
- Snowflake and BigQuery: ``merge_statement`` below (one ``MERGE``), run by
  ``runtime.snowflake`` and ``runtime.bigquery``.

Runs wherever its caller runs (cluster or worker); imports pyarrow only inside its functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ..contracts import DataError, UpsertRule

if TYPE_CHECKING:
    import pyarrow as pa


def repeated_key_message(rule: UpsertRule, key: dict) -> str:
    named = ", ".join(f"{k}={key[k]!r}" for k in rule.keys)
    return f"upsert: key ({named}) appears more than once in this load; set sequence_by to keep the latest"


def check_no_repeated_key(table: pa.Table, rule: UpsertRule) -> None:
    """Rule 1 for a load held as an Arrow table (only the key columns are needed)."""
    import pyarrow.compute as pc

    counts = table.group_by(list(rule.keys)).aggregate([([], "count_all")])
    repeated = counts.filter(pc.greater(counts["count_all"], 1)).slice(0, 1).to_pylist()
    if repeated:
        raise DataError(repeated_key_message(rule, repeated[0]))


def merge_latest(existing: pa.Table, new: pa.Table, rule: UpsertRule) -> tuple[pa.Table, int]:
    """Rules 2-3 on Arrow tables: the merged rows (in key order) and how many keys were deleted.
    Rule 1 is the caller's, before it changes anything: ``check_no_repeated_key``."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    rows = pa.concat_tables([existing, new.select(existing.column_names)])
    rows = rows.append_column("_order", pa.array(np.arange(rows.num_rows)))  # existing first, then the load
    order = [(k, "ascending") for k in rule.keys]
    order += [(rule.sequence_by, "ascending")] if rule.sequence_by else []
    rows = rows.take(pc.sort_indices(rows, sort_keys=[*order, ("_order", "ascending")]))
    rows = rows.set_column(rows.schema.get_field_index("_order"), "_order", pa.array(np.arange(rows.num_rows)))
    latest = rows.group_by(list(rule.keys), use_threads=False).aggregate([("_order", "max")])["_order_max"]
    merged = rows.take(latest.take(pc.sort_indices(latest))).drop_columns(["_order"])
    if not rule.delete_column:
        return merged, 0
    keep = pc.invert(pc.fill_null(merged[rule.delete_column], False))
    return merged.filter(keep), merged.num_rows - pc.sum(keep.cast(pa.int64())).as_py()


def merge_statement(quote: Callable[[str], str], target: str, source: str, columns: Sequence[str], rule: UpsertRule):
    """Rules 2-3 as one ``MERGE INTO`` (Snowflake and BigQuery): the latest staged row per key
    (``QUALIFY``) merged into ``target``; ``quote`` quotes an identifier in the dialect."""
    names = ", ".join(map(quote, columns))
    rows = f"SELECT {names} FROM {source}"
    if rule.sequence_by:
        by = ", ".join(map(quote, rule.keys))
        rows += f" WHERE TRUE QUALIFY ROW_NUMBER() OVER (PARTITION BY {by} ORDER BY {quote(rule.sequence_by)} DESC) = 1"
    match = " AND ".join(f"t.{quote(k)} = s.{quote(k)}" for k in rule.keys)
    newer = ""
    if rule.sequence_by:  # rule 2: an older row never replaces (or deletes) a newer stored one
        seq = quote(rule.sequence_by)
        newer = f" AND (t.{seq} IS NULL OR s.{seq} IS NULL OR t.{seq} <= s.{seq})"
    flag = quote(rule.delete_column) if rule.delete_column else None
    clauses = [f"WHEN MATCHED AND s.{flag}{newer} THEN DELETE"] if flag else []
    updates = ", ".join(f"{quote(c)} = s.{quote(c)}" for c in columns if c not in rule.keys)
    if updates:
        clauses.append(f"WHEN MATCHED{newer} THEN UPDATE SET {updates}")
    # NOT COALESCE(...): Snowflake has no IS [NOT] TRUE.
    insert = f"WHEN NOT MATCHED{f' AND NOT COALESCE(s.{flag}, FALSE)' if flag else ''} THEN INSERT"
    clauses.append(f"{insert} ({names}) VALUES ({', '.join(f's.{quote(c)}' for c in columns)})")
    return f"MERGE INTO {target} AS t USING ({rows}) AS s ON {match}\n" + "\n".join(clauses)


def repeated_key_query(quote: Callable[[str], str], source: str, rule: UpsertRule) -> str:
    """Rule 1 in SQL: one key that the staged rows repeat (no row when none is repeated)."""
    keys = ", ".join(map(quote, rule.keys))
    return f"SELECT {keys} FROM {source} GROUP BY {keys} HAVING count(*) > 1 LIMIT 1"

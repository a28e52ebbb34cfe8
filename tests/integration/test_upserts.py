"""Upserts that arrive in any order, deletes, and a lake upsert killed mid-publish: real Ray
head over ray://, real PostgreSQL."""

from __future__ import annotations

import os
import shutil

import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from airflow_provider_raydata.contracts import Destination, ProducedBy
from airflow_provider_raydata.hooks.ray import RayHook
from airflow_provider_raydata.operators import RayDataLoadOperator
from airflow_provider_raydata.runtime import refs
from airflow_provider_raydata.runtime.postgres.publish import publish
from airflow_provider_raydata.runtime.postgres.staging import copy_to_staging
from tests.helpers import run_operator, staging_tables

pytestmark = pytest.mark.integration

SCHEMA = pa.schema([("id", pa.int64()), ("part", pa.int64()), ("v", pa.string()), ("seq", pa.int64()),
                    ("gone", pa.bool_())])  # fmt: skip
OLDER = [(1, 1, "a1", 1, False), (2, 0, "b1", 1, False), (3, 1, "c1", 1, False), (4, 0, "d1", 1, False)]
NEWER = [(3, 1, "c2", 2, False), (4, 0, "d2", 2, True), (5, 1, "e2", 2, False), (6, 0, "f2", 2, False)]


def committed(root, rows) -> dict:
    attempt = refs.new_attempt_uri(str(root), 1)
    os.makedirs(attempt)
    table = pa.Table.from_pylist([dict(zip(SCHEMA.names, row, strict=True)) for row in rows], schema=SCHEMA)
    pads.write_dataset(table, attempt, format="parquet", basename_template="part-{i}.parquet")
    return refs.commit(attempt, None, ProducedBy()).to_dict()


def lake(path) -> list[tuple]:
    partitioning = pads.partitioning(pa.schema([("part", pa.int64())]), flavor="hive")
    table = pads.dataset(path, format="parquet", partitioning=partitioning).to_table()
    return sorted(tuple(row[c] for c in SCHEMA.names) for row in table.to_pylist())


def upsert(ref, destination, run_id: str, try_number: int = 1, **kwargs):
    op = RayDataLoadOperator(task_id="upsert", input=ref, destination=destination, mode="upsert", keys=["id"], **kwargs)
    return run_operator(op, run_id=run_id, try_number=try_number)[0]


def test_lake_upsert_keeps_the_newest_row_whatever_the_order_and_applies_deletes(ray_conn, tmp_path):
    older, newer = committed(tmp_path / "older", OLDER), committed(tmp_path / "newer", NEWER)
    target = {"kind": "parquet", "path": str(tmp_path / "lake"), "sequence_by": "seq", "partition_by": ["part"]}
    upsert(newer, target, "run_2")
    upsert(older, target, "run_1")  # a backfill of an earlier day publishes last
    flagged = sorted({**{r[0]: r for r in OLDER}, **{r[0]: r for r in NEWER}}.values())
    assert lake(tmp_path / "lake") == flagged  # newest per key; the tombstone (gone=True) kept

    deleting = {**target, "path": str(tmp_path / "lake2"), "delete_column": "gone"}
    upsert(older, deleting, "run_1")
    result = upsert(newer, deleting, "run_2")
    assert result["rows_deleted"] == 1 and result["rows_written"] == 4
    assert lake(tmp_path / "lake2") == [row for row in flagged if row[0] != 4]


def test_lake_upsert_killed_between_publishing_and_cleaning_up_is_repaired_by_the_retry(ray_conn, tmp_path):
    older, newer = committed(tmp_path / "older", OLDER), committed(tmp_path / "newer", NEWER)
    target = {"kind": "parquet", "path": str(tmp_path / "lake"), "sequence_by": "seq", "partition_by": ["part"]}
    upsert(older, target, "run_1")
    saved = tmp_path / "saved"
    shutil.copytree(tmp_path / "lake", saved, ignore=shutil.ignore_patterns("_staging"))
    upsert(newer, target, "run_2")
    expected = lake(tmp_path / "lake")
    # As if try 1 had died after moving its merged files in and before deleting the old ones.
    shutil.copytree(saved, tmp_path / "lake", dirs_exist_ok=True)
    assert len(lake(tmp_path / "lake")) > len(expected)
    upsert(newer, target, "run_2", try_number=2)
    assert lake(tmp_path / "lake") == expected


def test_upsert_with_repeated_keys_and_no_sequence_fails_and_changes_nothing(ray_conn, pg, tmp_path):
    twice = committed(tmp_path / "twice", [*OLDER, (1, 1, "a9", 9, False)])
    lake_target = {"kind": "parquet", "path": str(tmp_path / "lake"), "partition_by": ["part"]}
    with pytest.raises(AirflowException, match=r"key \(id=1\) appears more than once"):
        upsert(twice, lake_target, "run_1")
    assert not (tmp_path / "lake").exists() or lake(tmp_path / "lake") == []

    # PostgreSQL fails without retries whichever way the load goes: a first load (missing or
    # empty table) finds the key when it builds the unique index, a later one before its COPY.
    pg_target = {"kind": "postgres", "postgres_conn_id": pg.conn_id, "table": "items"}
    first_load = r"public.items has a unique index that this load breaks: Key \(id\)=\(1\) is duplicated"
    with pytest.raises(AirflowFailException, match=first_load):
        upsert(twice, pg_target, "run_1")
    assert pg.conn.execute("SELECT to_regclass('items')").fetchone()[0] is None
    pg.conn.execute("CREATE TABLE items (id bigint PRIMARY KEY, part bigint, v text, seq bigint, gone boolean)")
    with pytest.raises(AirflowFailException, match=first_load):
        upsert(twice, pg_target, "run_1")
    pg.conn.execute("INSERT INTO items VALUES (7, 0, 'kept', 0, false)")
    with pytest.raises(AirflowFailException, match=r"key \(id=1\) appears more than once"):
        upsert(twice, pg_target, "run_1")
    assert pg.conn.execute("SELECT id, v FROM items").fetchall() == [(7, "kept")]
    assert staging_tables(pg.conn) == []


def test_postgres_upsert_never_replaces_a_newer_row_with_an_older_one(ray_conn, pg, tmp_path):
    older, newer = committed(tmp_path / "older", OLDER), committed(tmp_path / "newer", NEWER)
    target = {"kind": "postgres", "postgres_conn_id": pg.conn_id, "table": "items", "sequence_by": "seq"}
    upsert(newer, {**target, "delete_column": "gone"}, "run_2")
    upsert(older, {**target, "delete_column": "gone"}, "run_1")  # a late backfill of an older day
    rows = pg.conn.execute("SELECT id, part, v, seq, gone FROM items ORDER BY id").fetchall()
    # 3 keeps its newer version. 4 was deleted by the newer load, then the older load (which never
    # saw the delete) inserted it again: use tombstones (no delete_column) where runs may reorder.
    assert rows == [OLDER[0], OLDER[1], NEWER[0], OLDER[3], NEWER[2], NEWER[3]]


def test_postgres_first_upsert_is_swapped_in_and_a_table_filled_meanwhile_is_merged(ray_conn, pg, tmp_path):
    older, newer = committed(tmp_path / "older", OLDER), committed(tmp_path / "newer", NEWER)
    columns = "id, part, v, seq, gone"

    # Into a missing table: created with the key as its primary key, named after the table.
    upsert(older, {"kind": "postgres", "postgres_conn_id": pg.conn_id, "table": "items"}, "run_1")
    upsert(newer, {"kind": "postgres", "postgres_conn_id": pg.conn_id, "table": "items"}, "run_2")
    assert pg.conn.execute(f"SELECT {columns} FROM items ORDER BY id").fetchall() == [*OLDER[:2], *NEWER]
    key = "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = %s::regclass"
    assert pg.conn.execute(key, ["items"]).fetchall() == [("items_pkey", "PRIMARY KEY (id)")]

    # Into an existing empty keyed table: its key, grants and comment stay (a dropped column too).
    pg.conn.execute("CREATE TABLE keyed (old int, id bigint CONSTRAINT keyed_id PRIMARY KEY, part bigint, v text,"
                    " seq bigint, gone boolean)")  # fmt: skip
    pg.conn.execute("ALTER TABLE keyed DROP COLUMN old; GRANT SELECT ON keyed TO PUBLIC")
    pg.conn.execute("COMMENT ON TABLE keyed IS 'keyed items'")
    acl = "SELECT relacl::text, obj_description(oid, 'pg_class') FROM pg_class WHERE oid = %s::regclass"
    before = pg.conn.execute(acl, ["keyed"]).fetchone()
    upsert(older, {"kind": "postgres", "postgres_conn_id": pg.conn_id, "table": "keyed"}, "run_1")
    assert pg.conn.execute(f"SELECT {columns} FROM keyed ORDER BY id").fetchall() == OLDER
    assert pg.conn.execute(acl, ["keyed"]).fetchone() == before and "=r/" in before[0]
    assert [name for name, _ in pg.conn.execute(key, ["keyed"]).fetchall()] == ["keyed_id"]

    # An empty table that another table's foreign key references cannot be swapped: the staged
    # rows are inserted into it instead.
    pg.conn.execute("CREATE TABLE parent (LIKE keyed INCLUDING ALL); CREATE TABLE child (id bigint REFERENCES parent)")
    upsert(older, {"kind": "postgres", "postgres_conn_id": pg.conn_id, "table": "parent"}, "run_1")
    assert pg.conn.execute(f"SELECT {columns} FROM parent ORDER BY id").fetchall() == OLDER

    # Staged as a first load, but another writer fills the table before the publish: the
    # staged rows are upserted into it, and the other writer's rows stay.
    with RayHook().connect():  # copy_to_staging's COPY tasks run on the cluster
        for table, made_meanwhile in (("raced", False), ("late", True)):
            if not made_meanwhile:
                pg.conn.execute(f"CREATE TABLE {table} (LIKE keyed INCLUDING ALL)")
            options = {"kind": "postgres", "table": table, "mode": "upsert", "keys": ["id"]}
            destination = Destination.from_user(options).with_conn(pg.params)
            plan = copy_to_staging(older["uri"], None, destination, "0123456789abcdef")
            assert plan.first_load
            if made_meanwhile:
                pg.conn.execute(f"CREATE TABLE {table} (LIKE keyed INCLUDING ALL)")
            pg.conn.execute(f"INSERT INTO {table} VALUES (1, 1, 'outside', 0, false), (99, 0, 'outside', 0, false)")
            with pg.conn.transaction():
                publish(pg.conn, plan)
            rows = pg.conn.execute(f"SELECT {columns} FROM {table} ORDER BY id").fetchall()
            assert rows == [*OLDER, (99, 0, "outside", 0, False)]
    assert staging_tables(pg.conn) == []

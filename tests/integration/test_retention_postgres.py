"""Orphaned PostgreSQL staging tables: noted at creation, swept by age, never while in use.
Real PostgreSQL and Ray head (``copy_to_staging``'s COPY tasks run on it)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_provider_raydata.contracts import Destination
from airflow_provider_raydata.hooks.postgres import sweep_postgres
from airflow_provider_raydata.hooks.ray import RayHook
from airflow_provider_raydata.runtime.postgres.publish import publish
from airflow_provider_raydata.runtime.postgres.staging import copy_to_staging
from airflow_provider_raydata.runtime.postgres.sweep import drop_orphaned_staging_tables

pytestmark = pytest.mark.integration

WEEK = timedelta(days=7)


@pytest.fixture
def committed(tmp_path):
    """A committed dataset's Parquet files: what ``copy_to_staging`` copies."""
    rows = pa.table({"id": pa.array([1, 2, 3], pa.int64()), "label": ["a", "b", "c"]})
    pq.write_table(rows, tmp_path / "part-0.parquet")
    return str(tmp_path)


def tables(pg, schema: str = "public") -> set[str]:
    rows = pg.conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s", [schema]).fetchall()
    return {name for (name,) in rows}


def staging_table(pg, name: str, created_days_ago: float | None, schema: str = "public") -> None:
    """A staging table as ``copy_to_staging`` leaves it; without a creation note when days is None."""
    pg.conn.execute(f'CREATE TABLE {schema}."{name}" (id bigint)')
    if created_days_ago is not None:
        created = datetime.now(UTC) - timedelta(days=created_days_ago)
        note = json.dumps({"raydata_staging": True, "load_id": "x", "created_at": created.isoformat()})
        pg.conn.execute(f"COMMENT ON TABLE {schema}.\"{name}\" IS '{note}'")


def postgres_destination(pg, options: dict) -> Destination:
    return Destination.from_user({"kind": "postgres", **options}).with_conn(pg.params)


def comment(pg, table: str) -> str | None:
    return pg.conn.execute("SELECT obj_description(to_regclass(%s), 'pg_class')", [table]).fetchone()[0]


def test_staging_notes_creation_time_and_publish_keeps_the_targets_comment(pg, ray_conn, committed):
    destination = postgres_destination(pg, {"table": "public.facts", "mode": "overwrite"})
    with RayHook().connect():  # copy_to_staging's COPY tasks run on the cluster
        plan = copy_to_staging(committed, None, destination, "0123456789abcdef")
        note = json.loads(comment(pg, plan.staging_table))
        assert note["load_id"] == "0123456789abcdef" and note["raydata_staging"] is True
        assert abs(datetime.fromisoformat(note["created_at"]) - datetime.now(UTC)) < timedelta(minutes=1)
        with pg.conn.transaction():
            publish(pg.conn, plan)
        assert comment(pg, "facts") is None  # a new target does not inherit the staging note

        pg.conn.execute("COMMENT ON TABLE facts IS 'daily facts'")
        again = copy_to_staging(committed, None, destination, "0123456789abcdef")
        with pg.conn.transaction():
            publish(pg.conn, again)  # swapped in
        assert comment(pg, "facts") == "daily facts"
        assert pg.conn.execute("SELECT count(*) FROM facts").fetchone()[0] == 3
        appended = postgres_destination(pg, {"table": "public.log", "mode": "append"})
        log = copy_to_staging(committed, None, appended, "fedcba9876543210")
        with pg.conn.transaction():
            publish(pg.conn, log)  # creates the table from the Arrow schema
        assert comment(pg, "log") is None
        assert drop_orphaned_staging_tables(pg.conn, ["public"], timedelta(0)) == []  # nothing left behind


def test_orphans_older_than_the_cutoff_are_dropped(pg):
    pg.conn.execute("CREATE TABLE _raydata_loads (target text, load_id text)")  # the ledger
    pg.conn.execute("CREATE TABLE _raydata_notes (id int)")  # a user's table with our prefix
    staging_table(pg, "_raydata_00000000000000aa_11111111", created_days_ago=10)
    staging_table(pg, "_raydata_00000000000000bb_22222222", created_days_ago=1)
    staging_table(pg, "_raydata_00000000000000cc_33333333", created_days_ago=None)  # made before notes
    pg.conn.execute("CREATE SCHEMA other")
    staging_table(pg, "_raydata_00000000000000dd_44444444", created_days_ago=10, schema="other")

    dry = drop_orphaned_staging_tables(pg.conn, ["public"], WEEK, dry_run=True)
    assert len(tables(pg)) == 5
    dropped = drop_orphaned_staging_tables(pg.conn, ["public"], WEEK)

    expected = ["public._raydata_00000000000000aa_11111111", "public._raydata_00000000000000cc_33333333"]
    assert dry == dropped == expected
    assert tables(pg) == {"_raydata_loads", "_raydata_notes", "_raydata_00000000000000bb_22222222"}
    assert tables(pg, "other") == {"_raydata_00000000000000dd_44444444"}  # schema not asked for


def test_a_table_in_use_by_an_open_transaction_is_kept(pg):
    staging_table(pg, "_raydata_00000000000000aa_11111111", created_days_ago=10)
    staging_table(pg, "_raydata_00000000000000bb_22222222", created_days_ago=None)
    staging_table(pg, "_raydata_00000000000000cc_33333333", created_days_ago=10)
    with psycopg.connect(**pg.params) as other:  # a transaction reading two of them, still open
        other.execute("SELECT count(*) FROM _raydata_00000000000000aa_11111111")
        other.execute("SELECT count(*) FROM _raydata_00000000000000bb_22222222")
        started = datetime.now()
        dropped = drop_orphaned_staging_tables(pg.conn, ["public"], WEEK)
        assert datetime.now() - started < timedelta(seconds=5)  # NOWAIT: skipped, not waited for
    assert dropped == ["public._raydata_00000000000000cc_33333333"]
    assert drop_orphaned_staging_tables(pg.conn, ["public"], WEEK) == [
        "public._raydata_00000000000000aa_11111111",
        "public._raydata_00000000000000bb_22222222",
    ]


def test_sweep_through_the_airflow_connection(pg):
    staging_table(pg, "_raydata_00000000000000aa_11111111", created_days_ago=10)
    staging_table(pg, "_raydata_00000000000000bb_22222222", created_days_ago=1)
    assert sweep_postgres(pg.conn_id, ["public"], WEEK) == ["public._raydata_00000000000000aa_11111111"]
    assert tables(pg) == {"_raydata_00000000000000bb_22222222"}

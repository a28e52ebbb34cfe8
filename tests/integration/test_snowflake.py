"""Snowflake as a source and a destination, against fakesnow's server on loopback (a DuckDB
stand-in speaking Snowflake's HTTP protocol to the real connector) and a real Ray head.

Exercised here exactly as against Snowflake: the SnowflakeHook connection parameters, qmark
and pyformat binding, result batches fetched by Ray read tasks, PUT of Parquet files to a named
internal stage, COPY INTO with MATCH_BY_COLUMN_NAME, the ledger, INSERT OVERWRITE, DELETE +
INSERT, MERGE, the transaction. Not exercised: see README.md (Snowflake, "What is tested").
"""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal

import pyarrow.parquet as pq
import pytest

from airflow_provider_raydata.operators import RayDataExtractOperator, RayDataLoadOperator
from tests.helpers import run_operator

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_conn(ray_head, tmp_path_factory):
    staging = str(tmp_path_factory.mktemp("sf-staging"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AIRFLOW_CONN_RAYDATA_DEFAULT", json.dumps(ray_head.connection(staging_uri=staging)))
        yield ray_head


def fill_source(sf, rows: int = 300) -> None:
    cur = sf.conn.cursor()
    cur.execute(
        'CREATE TABLE "src" ("id" NUMBER(19, 0), "name" VARCHAR, "amount" NUMBER(12, 2), "updated_at" TIMESTAMP_TZ,'
        ' "day" DATE, "active" BOOLEAN)'
    )
    cur.execute(
        """INSERT INTO "src" SELECT i, CASE WHEN i % 10 = 0 THEN NULL WHEN i % 10 = 1 THEN '' ELSE 'n' || i END,
        i * 1.25, DATEADD(hour, i % 72, '2024-01-01 00:00:00+00:00'::TIMESTAMP_TZ),
        DATEADD(day, i % 3, '2024-01-01'::DATE), i % 2 = 0
        FROM (SELECT seq4() + 1 AS i FROM TABLE(GENERATOR(ROWCOUNT => ?)))""",
        [rows],
    )


def rows(sf, sql: str) -> list[tuple]:
    return sf.conn.cursor().execute(sql).fetchall()


def load(sf, ref, table, mode, run_id="run-1", try_number=1, **kwargs):
    destination = {"kind": "snowflake", "snowflake_conn_id": sf.conn_id, "table": table}
    destination.update(kwargs.pop("destination", {}))
    op = RayDataLoadOperator(task_id="load", input=ref, destination=destination, mode=mode, **kwargs)
    return run_operator(op, run_id=run_id, try_number=try_number)[0]


def test_fakesnow_extract_binds_parameters_and_keeps_types(ray_conn, sf):
    fill_source(sf)
    extract = RayDataExtractOperator(
        task_id="extract_sf",
        source={
            "kind": "snowflake",
            "snowflake_conn_id": sf.conn_id,
            "query": 'SELECT * FROM "src" WHERE "day" = ? AND "id" <= ?',
            "parameters": ["2024-01-02", 200],
        },
    )
    ref, ti = run_operator(extract)
    got = pq.read_table(ref["uri"]).to_pandas().sort_values("id").reset_index(drop=True)
    assert ref["num_rows"] == len(got) == 67 and got["id"].tolist() == list(range(1, 201, 3))
    assert ref["schema"] == {
        "id": "int64",
        "name": "string",
        "amount": "decimal128(12, 2)",
        "updated_at": "timestamp[ns, tz=UTC]",
        "day": "date32[day]",
        "active": "bool",
    }
    assert got["amount"].tolist() == [Decimal(i) * Decimal("1.25") for i in got["id"]]
    assert got["name"].isna().sum() == (got["id"] % 10 == 0).sum() and (got["name"] == "").sum() == 7
    assert got["updated_at"][0] == dt.datetime(2024, 1, 1, 1, tzinfo=dt.UTC)
    assert "snow-secret" not in json.dumps(ti.xcoms, default=str)

    # A dict binds %(name)s in the connector; an injection attempt is only ever a value.
    hostile = RayDataExtractOperator(
        task_id="extract_hostile",
        source={
            "kind": "snowflake",
            "snowflake_conn_id": sf.conn_id,
            "query": 'SELECT "id" FROM "src" WHERE "name" = %(name)s',
            "parameters": {"name": 'x\'; DROP TABLE "src"; --'},
        },
    )
    ref, _ = run_operator(hostile)
    assert ref["num_rows"] == 0 and ref["schema"] == {"id": "int64"}
    assert rows(sf, 'SELECT count(*) FROM "src"') == [(300,)]


def test_fakesnow_load_modes_publish_exactly_once(ray_conn, sf):
    fill_source(sf)
    source = {"kind": "snowflake", "snowflake_conn_id": sf.conn_id, "table": "src"}
    ref = run_operator(RayDataExtractOperator(task_id="extract", source=source))[0]

    # overwrite creates the table with Snowflake types from the Arrow schema, through PUT + COPY INTO
    assert load(sf, ref, "target", "overwrite")["rows_written"] == 300
    assert rows(sf, 'SELECT * FROM "target" ORDER BY "id"') == rows(sf, 'SELECT * FROM "src" ORDER BY "id"')
    load(sf, ref, "target", "overwrite", run_id="run-2")
    assert rows(sf, 'SELECT count(*) FROM "target"') == [(300,)]

    # append: a retry of the same run is not appended twice; another run is
    load(sf, ref, "target", "append", run_id="run-3")
    again = load(sf, ref, "target", "append", run_id="run-3", try_number=2)
    assert again["skipped"] and rows(sf, 'SELECT count(*) FROM "target"') == [(600,)]

    # replace_partition: only the days in this load are replaced
    day_two = RayDataExtractOperator(
        task_id="day_two", source={**source, "table": None, "query": 'SELECT * FROM "src" WHERE "day" = \'2024-01-02\''}
    )
    day_ref = run_operator(day_two)[0]
    result = load(sf, day_ref, "target", "replace_partition", run_id="run-4", partition_by=["day"])
    assert result["partitions"] == ["2024-01-02"] and result["rows_deleted"] == 200
    per_day = dict(rows(sf, 'SELECT "day"::VARCHAR, count(*) FROM "target" GROUP BY 1'))
    assert per_day == {"2024-01-01": 200, "2024-01-02": 100, "2024-01-03": 200}

    # upsert: the latest version per key wins, flagged rows are deleted, new keys inserted
    cur = sf.conn.cursor()
    cur.execute('CREATE TABLE "changes" AS SELECT *, FALSE AS "deleted" FROM "src" WHERE "id" <= 3')
    cur.execute('UPDATE "changes" SET "name" = \'changed\', "updated_at" = DATEADD(day, 1, "updated_at")')
    cur.execute(
        "INSERT INTO \"changes\" SELECT 1, 'older', 0, '2023-01-01 00:00:00+00:00', \"day\", TRUE, FALSE"
        ' FROM "src" WHERE "id" = 1'
    )
    cur.execute(
        "INSERT INTO \"changes\" VALUES (5000, 'new', 1, '2024-01-05 00:00:00+00:00', '2024-01-05', TRUE, FALSE)"
    )
    cur.execute('UPDATE "changes" SET "deleted" = TRUE WHERE "id" = 3')
    cur.execute('CREATE TABLE "dim" AS SELECT *, FALSE AS "deleted" FROM "src"')
    changes = run_operator(RayDataExtractOperator(task_id="changes", source={**source, "table": "changes"}))[0]
    upsert = {"sequence_by": "updated_at", "delete_column": "deleted"}
    for run_id in ("run-5", "run-6"):  # the same changes twice give the same table
        result = load(sf, changes, "dim", "upsert", run_id=run_id, keys=["id"], destination=upsert)
        assert rows(sf, 'SELECT count(*) FROM "dim"') == [(300,)]  # 300 - 1 deleted + 1 new
        names = dict(rows(sf, 'SELECT "id", "name" FROM "dim" WHERE "id" IN (1, 2, 3, 5000)'))
        assert names == {1: "changed", 2: "changed", 5000: "new"}
    with pytest.raises(Exception, match=r"key \(id=1\) appears more than once"):
        load(sf, changes, "dim", "upsert", run_id="run-7", keys=["id"])

    # A table name that tries injection is quoted as one identifier: it names a (strange) table.
    hostile = 'evil"; DROP TABLE "src"; --'
    load(sf, ref, hostile, "overwrite", run_id="run-8")
    assert rows(sf, 'SELECT count(*) FROM "evil""; DROP TABLE ""src""; --"') == [(300,)]
    assert rows(sf, 'SELECT count(*) FROM "src"') == [(300,)]
    tables = rows(sf, "SELECT table_name FROM information_schema.tables WHERE startswith(table_name, '_raydata_')")
    assert tables == [("_raydata_loads",)]  # no staging table left behind

"""PostgreSQL as a source and a destination: a real server (initdb) and a real Ray head over ray://."""

from __future__ import annotations

import datetime as dt
import json
import os
from decimal import Decimal

import pandas as pd
import pyarrow.parquet as pq
import pytest
from airflow.sdk.exceptions import AirflowFailException

from airflow_provider_raydata.operators import RayDataExtractOperator, RayDataLoadOperator
from tests.helpers import run_operator, staging_tables

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_conn(ray_head, tmp_path_factory):
    """``raydata_default``: the test head, with a staging location of its own."""
    staging = str(tmp_path_factory.mktemp("pg-staging"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AIRFLOW_CONN_RAYDATA_DEFAULT", json.dumps(ray_head.connection(staging_uri=staging)))
        yield ray_head


SOURCE_DDL = """
CREATE TABLE src (
    id bigint PRIMARY KEY, name text, amount numeric(12, 2), updated_at timestamptz,
    day date, active boolean, payload jsonb, uid uuid
)
"""


def fill_source(conn, rows: int = 3000) -> None:
    conn.execute(SOURCE_DDL)
    conn.execute(
        """
        INSERT INTO src
        SELECT i, CASE WHEN mod(i, 10) = 0 THEN NULL WHEN mod(i, 10) = 1 THEN '' ELSE 'name, "' || i || E'"\\n' END,
               (i * 1.25)::numeric(12, 2), timestamptz '2024-01-01 00:00:00+00' + mod(i, 72) * interval '1 hour',
               date '2024-01-01' + mod(i, 3), mod(i, 2) = 0, jsonb_build_object('i', i), md5(i::text)::uuid
        FROM generate_series(1, %s) AS i
        """,
        [rows],
    )


def committed(ref: dict) -> pd.DataFrame:
    return pq.read_table(ref["uri"]).to_pandas()


def table_rows(conn, table: str, order: str = "id") -> list[tuple]:
    return conn.execute(f"SELECT * FROM {table} ORDER BY {order}").fetchall()


def test_sharded_extract_binds_parameters_and_keeps_types(ray_conn, pg):
    fill_source(pg.conn)
    extract = RayDataExtractOperator(
        task_id="extract_pg",
        source={
            "kind": "postgres",
            "postgres_conn_id": pg.conn_id,
            "query": "SELECT * FROM src WHERE updated_at >= %(start)s AND updated_at < %(end)s",
            "parameters": {"start": "2024-01-02T00:00:00+00:00", "end": "2024-01-03T00:00:00+00:00"},
            "shard_key": "id",
            "num_shards": 4,
        },
    )
    ref, ti = run_operator(extract)
    expected = pg.conn.execute(  # an independent read of the same window
        "SELECT id FROM src WHERE updated_at >= '2024-01-02 00:00+00' AND updated_at < '2024-01-03 00:00+00'"
    ).fetchall()
    got = committed(ref).sort_values("id").reset_index(drop=True)
    assert ref["num_rows"] == len(expected) > 900
    assert ref["num_files"] >= 1
    assert ref["schema"]["amount"] == "decimal128(12, 2)"
    assert ref["schema"]["updated_at"] == "timestamp[us, tz=UTC]"
    assert ref["schema"]["day"] == "date32[day]"
    assert ref["schema"]["active"] == "bool"
    assert got["id"].tolist() == sorted(i for (i,) in expected)
    assert got["amount"].tolist() == [Decimal(i) * Decimal("1.25") for i in got["id"]]
    assert got["name"].isna().sum() == (got["id"] % 10 == 0).sum()  # NULL stays NULL, '' stays ''
    assert (got["name"] == "").sum() == (got["id"] % 10 == 1).sum()
    assert json.loads(got["payload"][0]) == {"i": int(got["id"][0])}
    assert "password" not in json.dumps(ti.xcoms, default=str)

    # A value that tries injection is only ever a bound parameter: no rows, nothing dropped.
    hostile = RayDataExtractOperator(
        task_id="extract_hostile",
        source={
            "kind": "postgres",
            "postgres_conn_id": pg.conn_id,
            "query": "SELECT id FROM src WHERE name = %(name)s",
            "parameters": {"name": "x'; DROP TABLE src; --"},
        },
    )
    ref, _ = run_operator(hostile)
    assert ref["num_rows"] == 0 and ref["schema"] == {"id": "int64"}
    assert pg.conn.execute("SELECT count(*) FROM src").fetchone()[0] == 3000


def extract_source(pg, task_id: str = "extract", where: str = "TRUE") -> dict:
    op = RayDataExtractOperator(
        task_id=task_id,
        source={"kind": "postgres", "postgres_conn_id": pg.conn_id, "query": f"SELECT * FROM src WHERE {where}"},
        columns=["id", "name", "amount", "updated_at", "day", "active"],
    )
    return run_operator(op)[0]


def load(pg, ref, table, mode, run_id="run-1", try_number=1, **kwargs):
    op = RayDataLoadOperator(
        task_id="load",
        input=ref,
        destination={"kind": "postgres", "postgres_conn_id": pg.conn_id, "table": table},
        mode=mode,
        **kwargs,
    )
    return run_operator(op, run_id=run_id, try_number=try_number)[0]


def test_load_modes_publish_exactly_once(ray_conn, pg):
    fill_source(pg.conn, rows=2000)
    ref = extract_source(pg)
    source = table_rows(pg.conn, "src")

    # overwrite creates the table with PostgreSQL types from the Arrow schema
    result = load(pg, ref, "public.target", "overwrite")
    assert result["rows_written"] == 2000
    types = dict(
        pg.conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'target'"
        ).fetchall()
    )
    assert types == {
        "id": "bigint",
        "name": "text",
        "amount": "numeric",
        "updated_at": "timestamp with time zone",
        "day": "date",
        "active": "boolean",
    }
    assert table_rows(pg.conn, "target") == [row[:6] for row in source]
    pg.conn.execute("CREATE VIEW target_view AS SELECT id FROM target")  # overwrite must keep working
    load(pg, ref, "public.target", "overwrite", run_id="run-2")
    assert pg.conn.execute("SELECT count(*) FROM target_view").fetchone()[0] == 2000

    # append: a retry of the same run is not appended twice; another run is
    load(pg, ref, "appended", "append")
    again = load(pg, ref, "appended", "append", try_number=2)
    assert again["skipped"] and count(pg, "appended") == 2000
    load(pg, ref, "appended", "append", run_id="run-2")
    assert count(pg, "appended") == 4000

    # replace_partition: only the days in this load are replaced, the same day twice = same table
    load(pg, ref, "by_day", "overwrite")
    day_two = extract_source(pg, "extract_day", "day = date '2024-01-02' AND id <= 1000")
    for run_id in ("run-3", "run-4"):
        result = load(pg, day_two, "by_day", "replace_partition", run_id=run_id, partition_by=["day"])
        assert result["partitions"] == ["2024-01-02"]
        per_day = dict(pg.conn.execute("SELECT day::text, count(*) FROM by_day GROUP BY day").fetchall())
        expected = dict(pg.conn.execute("SELECT day::text, count(*) FROM src GROUP BY day").fetchall())
        assert per_day == {**expected, "2024-01-02": day_two["num_rows"]} and day_two["num_rows"] < 667

    # upsert on id: changed rows updated, new rows inserted, flagged rows deleted, latest version wins
    pg.conn.execute("CREATE TABLE changes AS SELECT id, name, amount, updated_at, day, active FROM src WHERE id <= 3")
    pg.conn.execute("ALTER TABLE changes ADD COLUMN deleted boolean DEFAULT false")
    pg.conn.execute("UPDATE changes SET name = 'changed', updated_at = updated_at + interval '1 day'")
    pg.conn.execute(
        "INSERT INTO changes SELECT 1, 'older', 0, updated_at - interval '9 days', day, active, false "
        "FROM changes WHERE id = 1"
    )
    pg.conn.execute("INSERT INTO changes VALUES (5000, 'new', 1, now(), '2024-01-05', true, false)")
    pg.conn.execute("UPDATE changes SET deleted = true WHERE id = 3")
    pg.conn.execute("ALTER TABLE target ADD COLUMN deleted boolean, ADD PRIMARY KEY (id)")
    changes = RayDataExtractOperator(
        task_id="extract_changes", source={"kind": "postgres", "postgres_conn_id": pg.conn_id, "table": "changes"}
    )
    changes_ref = run_operator(changes)[0]
    destination = {
        "kind": "postgres",
        "postgres_conn_id": pg.conn_id,
        "table": "public.target",
        "sequence_by": "updated_at",
        "delete_column": "deleted",
    }
    for run_id in ("run-5", "run-6"):  # the same changes twice give the same table
        op = RayDataLoadOperator(
            task_id="upsert", input=changes_ref, destination=destination, mode="upsert", keys=["id"]
        )
        result = run_operator(op, run_id=run_id)[0]
        assert count(pg, "target") == 2000  # 2000 - 1 deleted + 1 new
        names = dict(pg.conn.execute("SELECT id, name FROM target WHERE id IN (1, 2, 3, 5000)").fetchall())
        assert names == {1: "changed", 2: "changed", 5000: "new"}
    assert result["rows_deleted"] in (0, 1)
    assert staging_tables(pg.conn) == []


def test_overwrite_keeps_the_tables_owner_grants_and_triggers(ray_conn, pg, monkeypatch):
    connection = json.loads(os.environ["AIRFLOW_CONN_PG_TEST"])
    fill_source(pg.conn, rows=100)
    ref = extract_source(pg)
    reader, owner = f"reader_{pg.dbname}", f"owner_{pg.dbname}"  # roles are per server, not per database
    load(pg, ref, "shared", "overwrite")
    for statement in (
        f"CREATE ROLE {reader}",
        f"CREATE ROLE {owner}",
        f"GRANT SELECT ON shared TO {reader} WITH GRANT OPTION",
        "GRANT INSERT ON shared TO PUBLIC",
        f"ALTER TABLE shared OWNER TO {owner}",
        "ALTER TABLE shared ADD CONSTRAINT shared_key PRIMARY KEY (id)",
        "CREATE INDEX shared_by_day ON shared (day)",
    ):
        pg.conn.execute(statement)
    before = relation(pg)

    load(pg, ref, "shared", "overwrite", run_id="run-2")
    swapped = relation(pg)
    assert swapped["oid"] != before["oid"]  # a new table was swapped in ...
    assert swapped["owner"] == owner and swapped["acl"] == before["acl"]  # ... owned and granted as before
    assert swapped["indexes"] == before["indexes"] == ["shared_by_day", "shared_key"]  # ... its indexes named so
    assert count(pg, "shared") == 100

    # A trigger does not survive a swap: the rows are replaced in place and the trigger stays.
    pg.conn.execute("CREATE TABLE inserts (at timestamptz DEFAULT now())")
    pg.conn.execute(
        "CREATE FUNCTION note_insert() RETURNS trigger LANGUAGE plpgsql AS "
        "$$BEGIN INSERT INTO inserts DEFAULT VALUES; RETURN NULL; END$$"
    )
    pg.conn.execute("CREATE TRIGGER noted AFTER INSERT ON shared FOR EACH STATEMENT EXECUTE FUNCTION note_insert()")
    load(pg, ref, "shared", "overwrite", run_id="run-3")
    assert relation(pg) == swapped and count(pg, "shared") == 100
    assert count(pg, "inserts") == 1

    # Nor does a foreign key to another table.
    pg.conn.execute("DROP TRIGGER noted ON shared")
    pg.conn.execute("CREATE TABLE days AS SELECT DISTINCT day FROM shared; ALTER TABLE days ADD PRIMARY KEY (day)")
    pg.conn.execute("ALTER TABLE shared ADD CONSTRAINT shared_day FOREIGN KEY (day) REFERENCES days")
    load(pg, ref, "shared", "overwrite", run_id="run-3b")
    assert relation(pg) == swapped and count(pg, "shared") == 100
    foreign_keys = "SELECT conname FROM pg_constraint WHERE conrelid = 'shared'::regclass AND contype = 'f'"
    assert pg.conn.execute(foreign_keys).fetchall() == [("shared_day",)]
    pg.conn.execute("ALTER TABLE shared DROP CONSTRAINT shared_day")

    # A loading role that does not own the table replaces its rows in place, with its privileges.
    loader = f"loader_{pg.dbname}"
    for statement in (
        f"CREATE ROLE {loader} LOGIN PASSWORD 'loader-pw'",
        f"GRANT CREATE, USAGE ON SCHEMA public TO {loader}",
        f"GRANT SELECT, INSERT, UPDATE ON _raydata_loads TO {loader}",
        f"GRANT SELECT, INSERT, TRUNCATE ON shared TO {loader}",
    ):
        pg.conn.execute(statement)
    swapped = relation(pg)
    monkeypatch.setenv("AIRFLOW_CONN_PG_TEST", json.dumps({**connection, "login": loader, "password": "loader-pw"}))
    load(pg, ref, "shared", "overwrite", run_id="run-4")
    monkeypatch.setenv("AIRFLOW_CONN_PG_TEST", json.dumps(connection))
    assert relation(pg) == swapped and count(pg, "shared") == 100

    # Rows other tables reference cannot be replaced: the load fails without retries, nothing changes.
    pg.conn.execute("CREATE TABLE child (parent bigint REFERENCES shared (id))")
    with pytest.raises(AirflowFailException, match="overwrite cannot replace .*shared.*foreign key"):
        load(pg, ref, "shared", "overwrite", run_id="run-5")
    assert relation(pg) == swapped and count(pg, "shared") == 100
    assert staging_tables(pg.conn) == []


def relation(pg, table: str = "shared") -> dict:
    row = pg.conn.execute(
        "SELECT oid, pg_get_userbyid(relowner), relacl::text[], ARRAY(SELECT indexrelid::regclass::text"
        " FROM pg_index WHERE indrelid = c.oid ORDER BY 1) FROM pg_class c WHERE oid = to_regclass(%s)",
        [table],
    ).fetchone()
    return {"oid": row[0], "owner": row[1], "acl": sorted(row[2]), "indexes": row[3]}


def count(pg, table: str) -> int:
    return pg.conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def test_bad_loads_name_the_problem_and_change_nothing(ray_conn, pg):
    fill_source(pg.conn, rows=500)
    ref = extract_source(pg)
    pg.conn.execute("CREATE TABLE narrow (id bigint PRIMARY KEY, amount numeric(12, 2) CHECK (amount < 100))")
    pg.conn.execute("INSERT INTO narrow VALUES (1, 1)")
    with pytest.raises(Exception, match="Column 'name' is not in table public.narrow"):
        load(pg, ref, "narrow", "append")
    amounts = RayDataExtractOperator(
        task_id="amounts",
        source={"kind": "postgres", "postgres_conn_id": pg.conn_id, "query": "SELECT id + 1 AS id, amount FROM src"},
    )
    only_ids = run_operator(amounts)[0]
    with pytest.raises(Exception, match="narrow_amount_check"):  # rows 80+ break the CHECK at publish
        load(pg, only_ids, "narrow", "append")
    # A load the data cannot satisfy fails without Airflow's retries (they would fail the same way).
    with pytest.raises(AirflowFailException, match=r"upsert into public.narrow on \(amount\) needs a primary key"):
        load(pg, only_ids, "narrow", "upsert", keys=["amount"])
    assert table_rows(pg.conn, "narrow") == [(1, Decimal("1.00"))]
    pg.conn.execute("CREATE TABLE unkeyed (id bigint, amount numeric(12, 2))")  # empty: the upsert would INSERT
    with pytest.raises(AirflowFailException, match=r"upsert into public.unkeyed on \(id\) needs a primary key"):
        load(pg, only_ids, "unkeyed", "upsert", keys=["id"])
    assert count(pg, "unkeyed") == 0
    pg.conn.execute("CREATE TABLE one_per_day (id bigint, day date UNIQUE); INSERT INTO one_per_day VALUES (1, NULL)")
    days = RayDataExtractOperator(
        task_id="days",
        source={"kind": "postgres", "postgres_conn_id": pg.conn_id, "query": "SELECT id, day FROM src"},
    )
    with pytest.raises(AirflowFailException, match=r"public.one_per_day has a unique index .*\(day\)=\(2024-01-0"):
        load(pg, run_operator(days)[0], "one_per_day", "overwrite")
    assert table_rows(pg.conn, "one_per_day") == [(1, None)]
    assert staging_tables(pg.conn) == []

    # A table name that tries injection is quoted as one identifier: it names a (strange) table.
    pg.conn.execute("CREATE TABLE victim (id int)")
    hostile = 'evil"; DROP TABLE victim; --'
    load(pg, only_ids, f"public.{hostile}", "overwrite")
    assert count(pg, "victim") == 0
    assert pg.conn.execute('SELECT count(*) FROM public."evil""; DROP TABLE victim; --"').fetchone()[0] == 500


def test_dates_and_timestamps_round_trip(ray_conn, pg, tmp_path):
    """A Parquet dataset with the usual warehouse types lands with the right values."""
    import pyarrow as pa

    from airflow_provider_raydata.contracts import ProducedBy
    from airflow_provider_raydata.runtime import refs

    table = pa.table(
        {
            "id": pa.array([1, 2, 3], pa.int32()),
            "at": pa.array([dt.datetime(2024, 1, 1, 12, tzinfo=dt.UTC), None, dt.datetime(2024, 6, 1, tzinfo=dt.UTC)]),
            "local": pa.array([dt.datetime(2024, 1, 1, 12, 30), None, dt.datetime(2024, 1, 2)]),
            "flag": [True, None, False],
            "ratio": [0.5, None, 1e-9],
            "text": ["a,b", "", None],
        }
    )
    attempt = refs.new_attempt_uri(str(tmp_path / "ref"), 1)
    os.makedirs(attempt)
    pq.write_table(table, f"{attempt}/part.parquet")
    ref = refs.commit(attempt, None, ProducedBy()).to_dict()
    load(pg, ref, "typed", "overwrite")
    rows = table_rows(pg.conn, "typed")
    assert rows == [
        (1, dt.datetime(2024, 1, 1, 12, tzinfo=dt.UTC), dt.datetime(2024, 1, 1, 12, 30), True, 0.5, "a,b"),
        (2, None, None, None, None, ""),
        (3, dt.datetime(2024, 6, 1, tzinfo=dt.UTC), dt.datetime(2024, 1, 2), False, 1e-9, None),
    ]

"""One upsert semantics (``runtime.upsert``), the same scenarios against every destination.

- lake: the load operator on a real Ray head (ray://), Parquet on local disk;
- postgres: the load operator on a real Ray head and a real PostgreSQL server;
- snowflake_fakesnow: the load operator on a real Ray head, publishing to fakesnow's server (a
  DuckDB stand-in speaking Snowflake's protocol to the real connector);
- bigquery_script_on_duckdb: the BigQuery request builder's upsert script (``load_plan``), run
  statement by statement on DuckDB as a stand-in for BigQuery (no BigQuery emulator exists):
  backtick identifiers become double-quoted ones, the rest of the SQL runs as built.

Each scenario's expected table comes from ``expected``, a plain-Python reading of the rules,
not from the code under test.
"""

from __future__ import annotations

import os
import re

import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from airflow.sdk.exceptions import AirflowFailException

from airflow_provider_raydata.contracts import DatasetRef, Destination, ProducedBy
from airflow_provider_raydata.operators import RayDataLoadOperator
from airflow_provider_raydata.runtime import refs
from airflow_provider_raydata.runtime.bigquery.load import load_plan
from tests.helpers import run_operator

pytestmark = [pytest.mark.integration, pytest.mark.slow]

COLUMNS = ("id", "v", "seq", "gone")
SCHEMA = pa.schema([("id", pa.int64()), ("v", pa.string()), ("seq", pa.int64()), ("gone", pa.bool_())])
OLDER = [(1, "a1", 1, False), (2, "b1", 1, False), (3, "c1", 1, False), (4, "d1", 1, False)]
NEWER = [(3, "c2", 2, False), (4, "d2", 2, True), (5, "e2", 2, False)]

# name -> (options of every load, the loads in publishing order, expected error or None)
SCENARIOS = {
    # Rule 2: a late backfill of an older day never replaces the newer rows (a flag is plain data here).
    "newer_then_older": ({"sequence_by": "seq"}, [NEWER, OLDER], None),
    # Rule 3: the newer load's flagged key is deleted; a flagged key the target lacks inserts nothing.
    "deletes": ({"sequence_by": "seq", "delete_column": "gone"}, [OLDER, NEWER, [(9, "x", 1, True)]], None),
    # Rules 2+3: a delete older than the stored row does not apply.
    "late_delete": ({"sequence_by": "seq", "delete_column": "gone"}, [NEWER, [(3, "c0", 0, True)]], None),
    # Rule 2 within one load: the latest version per key wins.
    "repeated_keys_with_sequence": (
        {"sequence_by": "seq"},
        [[(1, "a1", 1, False), (1, "a3", 3, False), (1, "a2", 2, False)]],
        None,
    ),  # fmt: skip
    # Rule 1: without sequence_by a repeated key fails the load and changes nothing.
    "repeated_keys_without_sequence": ({}, [OLDER, [(7, "g1", 1, False), (7, "g2", 2, False)]], "more than once"),
    # Rule 1 into a missing target: it is not even created (PostgreSQL finds the key when it builds
    # the new table's primary key: "Key (id)=(7) is duplicated").
    "repeated_keys_first_load": ({}, [[(7, "g1", 1, False), (7, "g2", 2, False)]], "more than once|is duplicated"),
    # Rule 2 without sequence_by: the load's row replaces the stored one.
    "no_sequence_load_wins": ({}, [NEWER, OLDER], None),
}


def expected(options: dict, loads: list[list[tuple]]) -> list[tuple]:
    """The rules of ``runtime.upsert``, read literally, for a scenario that succeeds."""
    table: dict[int, tuple] = {}
    sequence, flag = options.get("sequence_by") == "seq", options.get("delete_column") == "gone"
    for rows in loads:
        latest: dict[int, tuple] = {}
        for row in rows:  # the load's own version of each key
            if row[0] not in latest or (sequence and row[2] >= latest[row[0]][2]):
                latest[row[0]] = row
        for key, row in latest.items():
            stored = table.get(key)
            if sequence and stored is not None and stored[2] > row[2]:
                continue  # an older row never replaces a newer one
            if flag and row[3]:
                table.pop(key, None)
            else:
                table[key] = row
    return sorted(table.values())


def committed(root, rows) -> dict:
    attempt = refs.new_attempt_uri(str(root), 1)
    os.makedirs(attempt)
    table = pa.Table.from_pylist([dict(zip(COLUMNS, row, strict=True)) for row in rows], schema=SCHEMA)
    pads.write_dataset(table, attempt, format="parquet", basename_template="part-{i}.parquet")
    return refs.commit(attempt, None, ProducedBy()).to_dict()


class Operator:
    """Loads through ``RayDataLoadOperator`` (a new run per load: each is its own DAG run)."""

    def __init__(self, destination: dict, tmp_path):
        self.destination, self.tmp_path, self.runs = destination, tmp_path, 0

    def load(self, rows, options) -> None:
        self.runs += 1
        ref = committed(self.tmp_path / f"in-{self.runs}", rows)
        destination = {**self.destination, **options}
        op = RayDataLoadOperator(task_id="upsert", input=ref, destination=destination, mode="upsert", keys=["id"])
        run_operator(op, run_id=f"run_{self.runs}")


class Lake(Operator):
    def __init__(self, tmp_path, **_):
        super().__init__({"kind": "parquet", "path": str(tmp_path / "lake")}, tmp_path)

    def create_empty(self) -> None:
        os.makedirs(self.tmp_path / "lake")

    def exists(self) -> bool:
        return (self.tmp_path / "lake").exists()

    def rows(self) -> list[tuple]:
        if not self.exists():
            return []
        table = pads.dataset(str(self.tmp_path / "lake"), format="parquet").to_table()
        return sorted(tuple(row[c] for c in COLUMNS) for row in table.to_pylist())


class Postgres(Operator):
    def __init__(self, tmp_path, pg, **_):
        super().__init__({"kind": "postgres", "postgres_conn_id": pg.conn_id, "table": "items"}, tmp_path)
        self.pg = pg

    def create_empty(self) -> None:
        self.pg.conn.execute("CREATE TABLE items (id bigint PRIMARY KEY, v text, seq bigint, gone boolean)")

    def exists(self) -> bool:
        return self.pg.conn.execute("SELECT to_regclass('items')").fetchone()[0] is not None

    def rows(self) -> list[tuple]:
        if not self.exists():
            return []
        return self.pg.conn.execute("SELECT id, v, seq, gone FROM items ORDER BY id").fetchall()


class SnowflakeFakesnow(Operator):
    def __init__(self, tmp_path, sf, **_):
        super().__init__({"kind": "snowflake", "snowflake_conn_id": sf.conn_id, "table": "items"}, tmp_path)
        self.sf = sf

    def create_empty(self) -> None:
        self.sf.conn.cursor().execute(
            'CREATE TABLE "items" ("id" NUMBER(19, 0), "v" VARCHAR, "seq" NUMBER(19, 0), "gone" BOOLEAN)'
        )

    def exists(self) -> bool:
        cur = self.sf.conn.cursor()
        cur.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'items'")
        return bool(cur.fetchone()[0])

    def rows(self) -> list[tuple]:
        if not self.exists():
            return []
        cur = self.sf.conn.cursor()
        return [tuple(row) for row in cur.execute('SELECT "id", "v", "seq", "gone" FROM "items" ORDER BY 1')]


class BigQueryScriptOnDuckDB:
    """The upsert script BigQuery would run, run on DuckDB: the staging table holds the load (what
    the load job would have written), then each statement after the CREATE runs as built."""

    def __init__(self, tmp_path, **_):
        import duckdb

        self.db = duckdb.connect()
        self.loads = 0

    def create_empty(self) -> None:
        self.db.execute('CREATE TABLE "items" (id BIGINT, v VARCHAR, seq BIGINT, gone BOOLEAN)')

    def load(self, rows, options) -> None:
        self.loads += 1
        ref = DatasetRef(uri="gs://lake/in", schema={"id": "int64", "v": "string", "seq": "int64", "gone": "bool"})
        destination = Destination.from_user(
            {"kind": "bigquery", "table": "sales.items", "mode": "upsert", "keys": ["id"], **options}
        )
        plan = load_plan(ref, destination, f"load{self.loads}", "my-project")
        staging = plan.staging_table.rsplit(".", 1)[1]
        self.db.execute(f'CREATE OR REPLACE TABLE "{staging}" (id BIGINT, v VARCHAR, seq BIGINT, gone BOOLEAN)')
        self.db.executemany(f'INSERT INTO "{staging}" VALUES (?, ?, ?, ?)', rows)
        self.db.execute("BEGIN")  # BigQuery stops a script at its first failing statement
        try:
            for statement in plan.merge_script.rstrip(";").split(";\n"):
                if statement.startswith("CREATE TABLE IF NOT EXISTS `my-project`.`sales`.`items` LIKE"):
                    statement = f'CREATE TABLE IF NOT EXISTS "items" AS SELECT * FROM "{staging}" LIMIT 0'  # DuckDB
                self.db.execute(re.sub(r"`(?:[^`]+`\.`)*([^`]+)`", r'"\1"', statement))
            self.db.execute("COMMIT")
        except Exception as exc:
            self.db.execute("ROLLBACK")
            # BigQuery fails the job with reason invalidQuery: a data error (tests/unit/test_contracts.py)
            raise AirflowFailException(str(exc)) from exc

    def exists(self) -> bool:
        found = self.db.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'items'")
        return bool(found.fetchone()[0])

    def rows(self) -> list[tuple]:
        if not self.exists():
            return []
        return self.db.execute('SELECT id, v, seq, gone FROM "items" ORDER BY id').fetchall()


DIALECTS = {
    "lake": (Lake, ["ray_conn"]),
    "postgres": (Postgres, ["ray_conn", "pg"]),
    "snowflake_fakesnow": (SnowflakeFakesnow, ["ray_conn", "sf"]),
    "bigquery_script_on_duckdb": (BigQueryScriptOnDuckDB, []),
}


def destination_for(name: str, request, tmp_path):
    cls, fixtures = DIALECTS[name]
    return cls(tmp_path, **{fixture: request.getfixturevalue(fixture) for fixture in fixtures})


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_upsert_scenario(dialect, scenario, request, tmp_path):
    options, loads, error = SCENARIOS[scenario]
    target = destination_for(dialect, request, tmp_path)
    if error is None:
        for rows in loads:
            target.load(rows, options)
        assert target.rows() == expected(options, loads)
        return
    *before, failing = loads
    for rows in before:
        target.load(rows, options)
    with pytest.raises(AirflowFailException, match=error):  # a data error: no retry
        target.load(failing, options)
    assert target.rows() == expected(options, before)  # nothing changed
    assert target.exists() == bool(before)  # not even a missing target was created


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("table", ["missing", "empty"])
@pytest.mark.parametrize("options", [{}, {"sequence_by": "seq", "delete_column": "gone"}], ids=["plain", "sequenced"])
def test_first_upsert_into_a_missing_or_empty_target(dialect, table, options, request, tmp_path):
    """Rule 4 (a plain first load into PostgreSQL is staged and swapped in, a sequenced one merged)."""
    target = destination_for(dialect, request, tmp_path)
    if table == "empty":
        target.create_empty()
    target.load([*OLDER, (8, "h1", 1, True)], options)
    assert target.rows() == expected(options, [[*OLDER, (8, "h1", 1, True)]])

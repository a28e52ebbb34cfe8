"""Quiet days: a source with no rows commits a dataset that keeps the source's columns and types,
and the stages after it run on zero rows (on the real Ray head; PostgreSQL for SQL and loads)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException

from airflow_provider_raydata.operators import (
    RayDataExtractOperator,
    RayDataLoadOperator,
    RayDataQualityOperator,
    RayDataTransformOperator,
)
from tests.helpers import run_operator

pytestmark = pytest.mark.integration

FARES = pa.schema(
    [
        ("id", pa.int64()),
        ("surcharge", pa.decimal128(38, 10)),
        ("passengers", pa.int64()),
        ("pickup", pa.timestamp("us", tz="UTC")),
        ("zone", pa.string()),
    ]
)
DECLARED = {"id": "int64", "surcharge": "decimal128(38, 10)", "passengers": "int64"}


@pytest.fixture(scope="module")
def service(service_for_module):
    """The stage service for this module (the policies test also runs over ray://)."""
    return service_for_module


@pytest.fixture(scope="module")
def quiet(tmp_path_factory):
    """A directory of sources with no rows, one per file kind."""
    root = tmp_path_factory.mktemp("quiet")
    (root / "header_only.csv").write_text("id,zone,surcharge,passengers\n")
    (root / "no_records.jsonl").write_text("")
    pq.write_table(FARES.empty_table(), root / "empty.parquet")
    (root / "parquet_dir").mkdir()
    pq.write_table(FARES.empty_table(), root / "parquet_dir" / "part-0.parquet")
    day = root / "by_day" / "pickup_date=2024-01-01"
    day.mkdir(parents=True)
    pq.write_table(FARES.empty_table(), day / "part-0.parquet")
    return root


def extract(staging: str, **kwargs):
    ref, _ = run_operator(RayDataExtractOperator(task_id="extract", staging_uri=staging, **kwargs))
    return ref


def fare_batch(batch: pd.DataFrame) -> pd.DataFrame:
    """A pandas function that adds a column and leaves the declared ones alone."""
    batch["minutes"] = (batch["id"] % 60).astype("float64")
    return batch


@pytest.mark.parametrize(
    "name,options,schema",
    [
        (
            "header-only CSV, cast",
            {"source": "header_only.csv", "cast": DECLARED},
            {"id": "int64", "zone": "null", "surcharge": "decimal128(38, 10)", "passengers": "int64"},
        ),
        ("empty Parquet file", {"source": "empty.parquet"}, {f.name: str(f.type) for f in FARES}),
        (
            "Parquet directory, columns and filter",
            {"source": "parquet_dir", "columns": ["id", "surcharge"], "filter": "passengers > 1"},
            {"id": "int64", "surcharge": "decimal128(38, 10)"},
        ),
        (
            "JSON without records, cast",
            {"source": "no_records.jsonl", "cast": {"id": "int64", "zone": "string"}},
            {"id": "int64", "zone": "string"},
        ),
        (
            "a partitioned window with no partition",
            {
                "source": "by_day",
                "incremental": {"column": "pickup_date", "partitioned": True},
            },
            {f.name: str(f.type) for f in FARES},
        ),
    ],
)
def test_every_file_source_with_no_rows_keeps_its_schema(service, quiet, tmp_path, name, options, schema):
    options = {**options, "source": str(quiet / options["source"])}
    operator = RayDataExtractOperator(task_id="extract", staging_uri=str(tmp_path), **options)
    window = {
        "data_interval_start": datetime(2024, 1, 5, tzinfo=UTC),
        "data_interval_end": datetime(2024, 1, 6, tzinfo=UTC),
    }
    ref, _ = run_operator(operator, **window)
    assert (ref["num_rows"], ref["schema"]) == (0, schema), name
    assert pq.read_table(ref["uri"]).schema.names == list(schema)  # the committed file has the columns


@pytest.fixture(scope="module")
def no_fares(service, quiet, tmp_path_factory):
    """The empty Parquet source, extracted once."""
    return extract(str(tmp_path_factory.mktemp("no_fares")), source=str(quiet / "empty.parquet"))


def test_steps_on_zero_rows_give_zero_rows_with_the_output_columns(service, no_fares, tmp_path):
    right = extract(str(tmp_path / "zones"), source=str(_zones(tmp_path)))
    operator = RayDataTransformOperator(
        task_id="transform",
        input=no_fares,
        staging_uri=str(tmp_path / "staging"),
        fn=fare_batch,
        steps=[
            {"op": "filter", "expr": "passengers > 0"},
            {"op": "drop_duplicates", "keys": ["id"]},
            {"op": "join", "right": right, "on": ["zone"], "how": "left"},
            {"op": "aggregate", "by": ["borough"], "aggs": {"fares": ["count"], "surcharge": ["sum", "surcharge"]}},
        ],
    )
    ref, ti = run_operator(operator)
    assert ref["num_rows"] == 0
    assert ref["schema"] == {"borough": "string", "fares": "int64", "surcharge": "decimal128(38, 10)"}
    # A whole-table aggregate of no rows is one row, as in SQL: a count of 0 and a null sum.
    total = RayDataTransformOperator(
        task_id="total",
        input=no_fares,
        staging_uri=str(tmp_path / "staging"),
        steps=[{"op": "aggregate", "aggs": {"fares": ["count"], "surcharge": ["sum", "surcharge"]}}],
    )
    ref, _ = run_operator(total)
    assert pq.read_table(ref["uri"]).to_pylist() == [{"fares": 0, "surcharge": None}]
    # The same when the rows vanish on the way (a filter keeps none of them).
    some = tmp_path / "some.parquet"
    pq.write_table(
        pa.table({"id": [1, 2], "surcharge": [Decimal("1.5"), Decimal("2")]}, FARES.remove(4).remove(3).remove(2)), some
    )
    ref = extract(str(tmp_path / "some"), source=str(some))
    for by, expected in (([], [{"fares": 0, "surcharge": None}]), (["id"], [])):
        vanishing = RayDataTransformOperator(
            task_id="vanishing",
            input=ref,
            staging_uri=str(tmp_path / "staging"),
            steps=[
                {"op": "filter", "expr": "id > 10"},
                {"op": "aggregate", "by": by, "aggs": {"fares": ["count"], "surcharge": ["sum", "surcharge"]}},
            ],
        )
        out = run_operator(vanishing)[0]
        assert pq.read_table(out["uri"]).to_pylist() == expected, by
        assert list(out["schema"]) == [*by, "fares", "surcharge"] and out["schema"]["surcharge"] == "decimal128(38, 10)"


def first_fare(batch: pd.DataFrame) -> pd.DataFrame:
    """A function that cannot take an empty batch."""
    batch["first"] = batch["id"].iloc[0]
    return batch


def test_output_schema_stands_in_for_a_function_that_cannot_take_no_rows(service, no_fares, tmp_path):
    def transform(**kwargs):
        operator = RayDataTransformOperator(
            task_id="t", input=no_fares, fn=first_fare, staging_uri=str(tmp_path), **kwargs
        )
        return run_operator(operator)[0]

    with pytest.raises(AirflowFailException, match=r"raised IndexError: .*called with an empty batch .*output_schema="):
        transform()
    assert transform(output_schema={"first": "int64"})["schema"] == {**no_fares["schema"], "first": "int64"}


def _zones(tmp_path):
    path = tmp_path / "zones.parquet"
    pq.write_table(pa.table({"zone": ["a", "b"], "borough": ["Queens", "Bronx"]}), path)
    return path


def test_quality_on_zero_rows_lets_row_count_decide(service, no_fares, tmp_path):
    vacuous = [
        {"check": "not_null", "column": "id"},
        {"check": "unique", "columns": ["id"]},
        {"check": "range", "column": "passengers", "min": 0},
        {"check": "accepted_values", "column": "zone", "values": ["a"]},
    ]
    operator = RayDataQualityOperator(task_id="quality", input=no_fares, staging_uri=str(tmp_path), checks=vacuous)
    ref, ti = run_operator(operator)
    assert (ref["num_rows"], ref["schema"]) == (0, no_fares["schema"])
    report = ti.xcoms["quality_report"]
    assert report["passed"] and [c["passed"] for c in report["checks"]] == [True] * len(vacuous)
    failing = RayDataQualityOperator(
        task_id="quality",
        input=no_fares,
        staging_uri=str(tmp_path),
        checks=[*vacuous, {"check": "row_count", "min": 1}],
    )
    with pytest.raises(AirflowFailException, match=r"row_count"):
        run_operator(failing)


def test_loads_of_zero_rows_change_nothing_and_create_a_missing_table_with_the_declared_types(
    service, pg, no_fares, tmp_path
):
    for mode, options in [
        ("append", {}),
        ("replace_partition", {"partition_by": ["pickup"]}),
        ("upsert", {"keys": ["id"]}),
    ]:
        table = f"public.fares_{mode}"
        load = RayDataLoadOperator(
            task_id=f"load_{mode}",
            input=no_fares,
            destination={"kind": "postgres", "postgres_conn_id": pg.conn_id, "table": table},
            mode=mode,
            **options,
        )
        run_operator(load)
        columns = pg.conn.execute(
            "SELECT column_name, data_type, numeric_precision, numeric_scale FROM information_schema.columns "
            "WHERE table_name = %s ORDER BY ordinal_position",
            [f"fares_{mode}"],
        ).fetchall()
        assert columns == [
            ("id", "bigint", 64, 0),
            ("surcharge", "numeric", 38, 10),
            ("passengers", "bigint", 64, 0),
            ("pickup", "timestamp with time zone", None, None),
            ("zone", "text", None, None),
        ], mode
        assert pg.conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0
    # Into an existing table with rows: append, replace_partition and upsert of nothing keep them.
    pg.conn.execute("INSERT INTO public.fares_upsert VALUES (1, 2.5, 1, '2024-01-01T08:00Z', 'a')")
    for mode, options in [
        ("append", {}),
        ("replace_partition", {"partition_by": ["pickup"]}),
        ("upsert", {"keys": ["id"]}),
    ]:
        load = RayDataLoadOperator(
            task_id=f"again_{mode}",
            input=no_fares,
            destination={"kind": "postgres", "postgres_conn_id": pg.conn_id, "table": "public.fares_upsert"},
            mode=mode,
            **options,
        )
        run_operator(load)
        assert pg.conn.execute("SELECT id, surcharge FROM public.fares_upsert").fetchall() == [(1, Decimal("2.5"))], (
            mode
        )
    # The lake: overwrite_partitions of no partitions changes nothing.
    lake = tmp_path / "lake"
    for mode in ("append", "overwrite_partitions"):
        load = RayDataLoadOperator(
            task_id=f"lake_{mode}", input=no_fares, destination=str(lake), mode=mode, partition_by=["zone"]
        )
        run_operator(load)
    assert not list(lake.rglob("*.parquet"))


def test_a_sql_query_with_no_rows_keeps_the_columns_postgres_describes(service, pg, tmp_path):
    pg.conn.execute("CREATE TABLE trips (id bigint, fare numeric(12, 2), at timestamptz, note text)")
    ref = extract(
        str(tmp_path),
        source={"kind": "postgres", "postgres_conn_id": pg.conn_id, "query": "SELECT * FROM trips WHERE id > 0"},
    )
    assert (ref["num_rows"], ref["schema"]) == (
        0,
        {"id": "int64", "fare": "decimal128(12, 2)", "at": "timestamp[us, tz=UTC]", "note": "string"},
    )


@pytest.mark.parametrize("transport", ["ray", "service"])
def test_policies_for_empty_and_missing_inputs(service, ray_head, quiet, tmp_path, monkeypatch, transport):
    if transport == "ray":
        monkeypatch.setenv("AIRFLOW_CONN_RAYDATA_DEFAULT", json.dumps(ray_head.connection()))
    empty = str(quiet / "empty.parquet")
    with pytest.raises(AirflowSkipException, match=r"The source .*empty.parquet has no rows for this run"):
        extract(str(tmp_path), source=empty, on_empty="skip")
    with pytest.raises(AirflowFailException, match=r"has no rows for this run \(on_empty='fail'\)"):
        extract(str(tmp_path), source=empty, on_empty="fail")
    # JSON has no header: with no cast nothing declares the columns, and the task says so.
    with pytest.raises(AirflowFailException, match=r"nothing declares its columns .*cast="):
        extract(str(tmp_path), source=str(quiet / "no_records.jsonl"))
    missing = str(quiet / "2024-01-09" / "*.csv")
    with pytest.raises(AirflowException, match=r"Source path not found: .*2024-01-09") as retried:
        extract(str(tmp_path), source=missing)
    assert not isinstance(retried.value, (AirflowFailException, AirflowSkipException))  # retried: data may come
    with pytest.raises(AirflowSkipException, match=r"Source path not found: .*\(on_missing='skip'\)"):
        extract(str(tmp_path), source=missing, on_missing="skip")
    with pytest.raises(AirflowFailException, match=r"Source path not found"):
        extract(str(tmp_path), source=missing, on_missing="fail")


def test_overwrite_of_zero_rows_empties_the_target_as_asked(service, pg, no_fares, tmp_path):
    destination = {"kind": "postgres", "postgres_conn_id": pg.conn_id, "table": "public.fares"}
    pg.conn.execute(
        "CREATE TABLE fares (id bigint, surcharge numeric(38, 10), passengers bigint, pickup timestamptz, zone text)"
    )
    pg.conn.execute("INSERT INTO fares VALUES (1, 2.5, 1, '2024-01-01T08:00Z', 'a')")
    run_operator(RayDataLoadOperator(task_id="load", input=no_fares, destination=destination, mode="overwrite"))
    assert pg.conn.execute("SELECT count(*) FROM fares").fetchone()[0] == 0
    lake = tmp_path / "lake"
    (lake / "zone=a").mkdir(parents=True)
    pq.write_table(FARES.empty_table().drop_columns(["zone"]), lake / "zone=a" / "old.parquet")
    for mode, options in [("upsert", {"keys": ["id"]}), ("overwrite", {})]:
        load = RayDataLoadOperator(
            task_id=f"lake_{mode}", input=no_fares, destination=str(lake), mode=mode, partition_by=["zone"], **options
        )
        run_operator(load)
    assert not list(lake.rglob("*.parquet"))  # overwrite emptied it; the upsert changed nothing before


def test_fakesnow_loads_of_zero_rows_change_nothing(service, sf, no_fares):
    """Snowflake through fakesnow's server (a stand-in: no Snowflake runs here)."""
    cur = sf.conn.cursor()
    cur.execute(
        'CREATE TABLE "fares" ("id" NUMBER(19, 0), "surcharge" NUMBER(38, 10), "passengers" NUMBER(19, 0),'
        ' "pickup" TIMESTAMP_TZ, "zone" VARCHAR)'
    )
    cur.execute("INSERT INTO \"fares\" VALUES (1, 2.5, 1, '2024-01-01 08:00:00+00:00', 'a')")
    for mode, options in [
        ("append", {}),
        ("replace_partition", {"partition_by": ["zone"]}),
        ("upsert", {"keys": ["id"]}),
    ]:
        destination = {"kind": "snowflake", "snowflake_conn_id": sf.conn_id, "table": "fares"}
        load = RayDataLoadOperator(task_id=f"sf_{mode}", input=no_fares, destination=destination, mode=mode, **options)
        result = run_operator(load)[0]
        assert result["rows_written"] == 0, mode
        assert cur.execute('SELECT "id" FROM "fares"').fetchall() == [(1,)], mode

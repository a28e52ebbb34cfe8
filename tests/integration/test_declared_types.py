"""Declared types survive batch functions: whatever pandas infers from one batch's values, a column
keeps its type, and a table a load creates takes the declared types (real Ray head, PostgreSQL)."""

from __future__ import annotations

from decimal import Decimal

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from airflow.sdk.exceptions import AirflowFailException

from airflow_provider_raydata.operators import RayDataExtractOperator, RayDataLoadOperator, RayDataTransformOperator
from airflow_provider_raydata.runtime.types import arrow_type
from tests.helpers import run_operator

pytestmark = pytest.mark.integration

FARES = pa.schema(
    [
        ("id", pa.int64()),
        ("surcharge", pa.decimal128(38, 10)),
        ("passengers", pa.int64()),
        ("pickup", pa.timestamp("us", tz="America/New_York")),
        ("zone", pa.string()),
    ]
)


def fares(day: int, surcharges: list[str]) -> pa.Table:
    n = len(surcharges)
    return pa.table(
        {
            "id": list(range(day * 100, day * 100 + n)),
            "surcharge": [Decimal(s) for s in surcharges],
            "passengers": [None if i % 2 else i for i in range(n)],  # an integer column with nulls
            "pickup": [pd.Timestamp(f"2024-01-0{day}T08:00", tz="America/New_York")] * n,
            "zone": [f"z{i}" for i in range(n)],
        },
        schema=FARES,
    )


def as_ref(table: pa.Table, path) -> dict:
    """``table`` extracted (a committed dataset reference)."""
    path.mkdir(parents=True)
    pq.write_table(table, path / "part-0.parquet")
    return run_operator(RayDataExtractOperator(task_id="in", source=str(path), staging_uri=str(path / "_staging")))[0]


def with_minutes_pandas(batch: pd.DataFrame) -> pd.DataFrame:
    batch["minutes"] = batch["id"] * 2
    return batch


def with_minutes_pyarrow(table: pa.Table) -> pa.Table:
    return table.append_column("minutes", pc.multiply(table["id"], 2))


def with_minutes_numpy(batch: dict) -> dict:
    batch["minutes"] = batch["id"] * 2
    return batch


class WithMinutes:
    """A callable class (it runs in an actor pool)."""

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return with_minutes_pandas(batch)


def with_minutes_generator(batch: pd.DataFrame):
    yield with_minutes_pandas(batch)


FUNCTIONS = {
    "pandas": with_minutes_pandas,
    "pyarrow": with_minutes_pyarrow,
    "numpy": with_minutes_numpy,
    "class": WithMinutes,
    "generator": with_minutes_generator,
}


def transform(staging, ref, fn, batch_format="pandas", **kwargs) -> dict:
    operator = RayDataTransformOperator(
        task_id="transform", input=ref, fn=fn, batch_format=batch_format, staging_uri=str(staging), **kwargs
    )
    return run_operator(operator)[0]


@pytest.mark.parametrize("kind", list(FUNCTIONS))
def test_a_function_that_adds_a_column_leaves_the_others_as_declared(service_for_module, tmp_path, kind):
    table = fares(1, ["1.5", "0.25", "3"])
    batch_format = kind if kind in ("pyarrow", "numpy") else "pandas"
    out = transform(tmp_path / "staging", as_ref(table, tmp_path / "in"), FUNCTIONS[kind], batch_format)
    written = pq.read_table(out["uri"])
    assert written.schema.remove_metadata() == FARES.append(pa.field("minutes", pa.int64()))
    assert written.drop_columns(["minutes"]).to_pylist() == table.to_pylist()  # nulls stay nulls, not NaN
    assert written["passengers"].null_count == 1


def retype_ids(batch: pd.DataFrame) -> pd.DataFrame:
    batch["id"] = "F-" + batch["id"].astype(str)
    return batch


def huge_surcharge(batch: pd.DataFrame) -> pd.DataFrame:
    batch["surcharge"] = Decimal("123456789012345678901234567890.5")  # 30 digits before the point
    return batch


def test_a_type_the_function_changes_is_kept_and_a_value_that_does_not_fit_fails(service_for_module, tmp_path):
    ref = as_ref(fares(1, ["1.5"]), tmp_path / "in")
    out = transform(tmp_path / "a", ref, retype_ids)  # a number made text: the function's choice
    assert out["schema"]["id"] == "string"
    assert pq.read_table(out["uri"])["id"].to_pylist() == ["F-100"]
    with pytest.raises(AirflowFailException, match=r"column 'surcharge' was decimal128\(38, 10\), .*output_schema="):
        transform(tmp_path / "b", ref, huge_surcharge)
    out = transform(tmp_path / "c", ref, huge_surcharge, output_schema={"surcharge": "decimal128(38, 2)"})
    assert out["schema"]["surcharge"] == "decimal128(38, 2)"


def test_a_later_day_with_larger_decimals_upserts_into_the_table_the_first_day_created(
    service_for_module, pg, tmp_path
):
    destination = {"kind": "postgres", "postgres_conn_id": pg.conn_id, "table": "public.fares"}
    for day, surcharges in [(1, ["1.5", "0.25"]), (2, ["12345.5", "0.0000000001"])]:
        cleaned = transform(
            tmp_path / f"t{day}", as_ref(fares(day, surcharges), tmp_path / f"in{day}"), with_minutes_pandas
        )
        load = RayDataLoadOperator(task_id="load", input=cleaned, destination=destination, mode="upsert", keys=["id"])
        run_operator(load, run_id=f"scheduled__2024-01-0{day}T00:00:00+00:00")
    columns = pg.conn.execute(
        "SELECT column_name, data_type, numeric_precision, numeric_scale FROM information_schema.columns "
        "WHERE table_name = 'fares' ORDER BY ordinal_position"
    ).fetchall()
    assert columns[:3] == [("id", "bigint", 64, 0), ("surcharge", "numeric", 38, 10), ("passengers", "bigint", 64, 0)]
    assert columns[3][1] == "timestamp with time zone"
    rows = pg.conn.execute("SELECT id, surcharge, passengers FROM public.fares ORDER BY id").fetchall()
    assert rows == [
        (100, Decimal("1.5"), 0),
        (101, Decimal("0.25"), None),
        (200, Decimal("12345.5"), 0),
        (201, Decimal("0.0000000001"), None),
    ]


def test_hive_folders_add_columns_only_when_asked_and_typed(service_for_module, tmp_path):
    for day in ("2024-03-10", "2024-03-11"):
        (tmp_path / "in" / f"day={day}").mkdir(parents=True)
        pq.write_table(pa.table({"id": [1, 2]}), tmp_path / "in" / f"day={day}" / "part-0.parquet")

    def extract(**kwargs):
        operator = RayDataExtractOperator(
            task_id="x", source=str(tmp_path / "in"), staging_uri=str(tmp_path / "s"), **kwargs
        )
        return run_operator(operator)[0]

    assert extract()["schema"] == {"id": "int64"}  # no surprise column
    chosen = extract(partition_columns={"day": "date32"}, columns=["id", "day"], filter="day > '2024-03-10'")
    assert chosen["schema"] == {"id": "int64", "day": "date32[day]"} and chosen["num_rows"] == 2
    ref = extract(partition_columns={"day": "date32"})
    assert ref["schema"] == {"id": "int64", "day": "date32[day]"}
    days = sorted(str(d) for d in pq.read_table(ref["uri"])["day"].to_pylist())
    assert days == ["2024-03-10", "2024-03-10", "2024-03-11", "2024-03-11"]
    with pytest.raises(
        AirflowFailException, match=r"Unknown column 'dt' in partition_columns of .*; available columns: day"
    ):
        extract(partition_columns={"dt": "date32"})


def trip_minutes(batch: pd.DataFrame) -> pd.DataFrame:
    batch["minutes"] = (batch["dropoff"] - batch["pickup"]).dt.total_seconds() / 60
    return batch


def test_a_user_pipeline_over_days_with_a_quiet_day_and_larger_decimals(service_for_module, pg, tmp_path):
    """CSV with declared types -> a pandas function -> a check -> upsert, day by day, as a user's DAG."""
    days = {
        "2024-01-01": "id,surcharge,passengers,pickup,dropoff\n1,0.5,2,2024-01-01T08:00Z,2024-01-01T08:30Z\n"
        "2,1.25,,2024-01-01T09:00Z,2024-01-01T09:10Z\n",
        "2024-01-02": "id,surcharge,passengers,pickup,dropoff\n",  # a quiet day: the header only
        "2024-01-03": "id,surcharge,passengers,pickup,dropoff\n3,12345.5,,2024-01-03T08:00Z,2024-01-03T09:00Z\n"
        "1,0.75,3,2024-01-01T08:00Z,2024-01-01T08:40Z\n",
    }
    cast = {
        "id": "int64",
        "surcharge": "decimal128(38, 10)",
        "passengers": "int64",
        "pickup": "timestamp[us, tz=UTC]",
        "dropoff": "timestamp[us, tz=UTC]",
    }
    destination = {"kind": "postgres", "postgres_conn_id": pg.conn_id, "table": "public.trips"}
    for day, text in days.items():
        (tmp_path / day).mkdir()
        (tmp_path / day / "trips.csv").write_text(text)
        run_id = f"scheduled__{day}T00:00:00+00:00"
        staging = str(tmp_path / "staging")
        extracted = run_operator(
            RayDataExtractOperator(
                task_id="extract", source=str(tmp_path / day / "*.csv"), cast=cast, staging_uri=staging
            ),
            run_id=run_id,
        )[0]
        cleaned = run_operator(
            RayDataTransformOperator(
                task_id="clean",
                input=extracted,
                fn=trip_minutes,
                output_schema={"minutes": "float64"},
                staging_uri=staging,
            ),
            run_id=run_id,
        )[0]
        assert cleaned["schema"] == {**{k: str(arrow_type(v)) for k, v in cast.items()}, "minutes": "double"}, day
        run_operator(
            RayDataLoadOperator(task_id="load", input=cleaned, destination=destination, mode="upsert", keys=["id"]),
            run_id=run_id,
        )
    types = pg.conn.execute(
        "SELECT column_name, data_type, numeric_precision, numeric_scale FROM information_schema.columns "
        "WHERE table_name = 'trips' ORDER BY ordinal_position"
    ).fetchall()
    assert [t[1:] for t in types] == [
        ("bigint", 64, 0),
        ("numeric", 38, 10),
        ("bigint", 64, 0),
        ("timestamp with time zone", None, None),
        ("timestamp with time zone", None, None),
        ("double precision", 53, None),
    ]
    rows = pg.conn.execute("SELECT id, surcharge, passengers, minutes FROM trips ORDER BY id").fetchall()
    assert rows == [
        (1, Decimal("0.75"), 3, 40.0),
        (2, Decimal("1.25"), None, 10.0),
        (3, Decimal("12345.5"), None, 60.0),
    ]


def test_an_aggregate_keeps_the_types_of_keys_sums_and_extremes(service_for_module, tmp_path):
    ref = as_ref(fares(1, ["1.5", "0.25", "3"]), tmp_path / "in")
    operator = RayDataTransformOperator(
        task_id="totals",
        input=ref,
        staging_uri=str(tmp_path / "staging"),
        steps=[
            {
                "op": "aggregate",
                "by": ["zone"],
                "aggs": {"surcharge": ["sum", "surcharge"], "first": ["min", "pickup"], "trips": ["count"]},
            }
        ],
    )
    out = run_operator(operator)[0]
    assert out["schema"] == {
        "zone": "string",
        "surcharge": "decimal128(38, 10)",  # not the precision pandas infers from these values
        "first": "timestamp[us, tz=America/New_York]",
        "trips": "int64",
    }

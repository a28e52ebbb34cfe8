"""The four operators against a real Ray head over ray://, on local files."""

from __future__ import annotations

import json
import os
import re
from datetime import datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from airflow_provider_raydata.contracts import ProducedBy
from airflow_provider_raydata.operators import (
    RayDataExtractOperator,
    RayDataLoadOperator,
    RayDataQualityOperator,
    RayDataTransformOperator,
)
from airflow_provider_raydata.runtime import refs
from tests import quality_data
from tests.helpers import FakeTaskInstance, run_operator

pytestmark = pytest.mark.integration


def modulo_band(batch: pd.DataFrame, divisor: int) -> pd.DataFrame:
    """A user function doing pandas arithmetic (pandas 3 Arrow-backed batches break on %)."""
    print(f"modulo_band: {len(batch)} rows")  # reaches the task log (see the test)
    batch["band"] = batch["id"] % divisor
    batch["double_price"] = batch["price"] * 2
    return batch


def always_fails(batch: pd.DataFrame) -> pd.DataFrame:
    raise ValueError("price column looks corrupt in this batch")


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    root = tmp_path_factory.mktemp("input")
    data = pa.table(
        {
            "id": pa.array(range(1, 1001), pa.int64()),
            "group": [f"g{i % 7}" for i in range(1000)],
            "price": [float(i % 97) for i in range(1000)],
            "day": pa.array(pd.to_datetime(["2024-01-01", "2024-01-02"] * 500).date, pa.date32()),
        }
    )
    pq.write_table(data.slice(0, 600), root / "part-0.parquet")
    pq.write_table(data.slice(600), root / "part-1.parquet")
    pacsv.write_csv(data, root / "data.csv")
    with open(root / "data.jsonl", "w") as out:
        for row in data.to_pylist():
            out.write(json.dumps({**row, "day": str(row["day"])}) + "\n")
    return root, data.to_pandas()


@pytest.fixture(scope="module")
def ray_conn(ray_head):
    """``raydata_default`` points at the test head for this module."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AIRFLOW_CONN_RAYDATA_DEFAULT", json.dumps(ray_head.connection()))
        yield ray_head


@pytest.fixture
def staging(tmp_path):
    return str(tmp_path / "staging")


@pytest.fixture(scope="module")
def source(ray_conn, table, tmp_path_factory):
    """The whole input, extracted once for the tests that only need a committed input."""
    root, _ = table
    return extract(str(tmp_path_factory.mktemp("shared") / "staging"), source=str(root))


def extract(staging, **kwargs):
    ref, ti = run_operator(RayDataExtractOperator(task_id="extract", staging_uri=staging, **kwargs))
    return ref


def test_extract_parquet_dir_with_filter_columns_and_cast(ray_conn, table, staging):
    root, frame = table
    ref = extract(
        staging,
        source=str(root),
        format="parquet",
        columns=["id", "price"],
        filter="day >= '2024-01-02' and price > 10",
        cast={"price": "float32"},
    )
    expected = frame[(frame["day"] >= pd.Timestamp("2024-01-02").date()) & (frame["price"] > 10)]
    assert ref["num_rows"] == len(expected)
    assert ref["schema"] == {"id": "int64", "price": "float"}
    assert ref["uri"].startswith(f"{staging}/tests/manual__2024-01-02T00_00_00_00_00/extract/attempt-1-")
    out = pq.read_table(ref["uri"]).to_pandas()
    assert sorted(out["id"]) == sorted(expected["id"])


@pytest.mark.parametrize("pattern,fmt", [("data.csv", "csv"), ("*.jsonl", "json")])
def test_extract_csv_and_json(ray_conn, table, staging, pattern, fmt):
    root, frame = table
    ref = extract(staging, source=f"{root}/{pattern}", format=fmt)
    assert ref["num_rows"] == len(frame)
    assert pq.read_table(ref["uri"]).column("price").to_pylist() is not None


def test_transform_user_function_and_steps_match_pandas(ray_conn, table, source, staging, capfd):
    root, frame = table
    dim = pd.DataFrame({"group": [f"g{i}" for i in range(5)], "label": [f"L{i}" for i in range(5)]})
    dim_path = f"{staging}-dim"

    os.makedirs(dim_path)
    pq.write_table(pa.Table.from_pandas(dim, preserve_index=False), f"{dim_path}/dim.parquet")
    dim_ref = extract(staging + "-d", source=dim_path)
    op = RayDataTransformOperator(
        task_id="transform",
        input=source,
        fn=modulo_band,
        fn_kwargs={"divisor": 3},
        staging_uri=staging,
        steps=[
            {"op": "filter", "expr": "band != 0"},
            {"op": "join", "right": dim_ref, "on": ["group"], "how": "left"},
            {
                "op": "aggregate",
                "by": ["label"],
                "aggs": {"total": ["sum", "double_price"], "n": ["count"], "groups": ["count_distinct", "group"]},
            },
        ],
    )
    ref, ti = run_operator(op)
    got = pq.read_table(ref["uri"]).to_pandas().set_index("label").sort_index()
    expected_rows = frame[frame["id"] % 3 != 0].merge(dim, on="group", how="left")
    expected = expected_rows.groupby("label", dropna=False).agg(
        total=("price", lambda s: (s * 2).sum()), n=("id", "size"), groups=("group", "nunique")
    )
    assert ti.xcoms["metrics"]["rows_in"] == 1000
    unmatched = got[got.index.isna()]  # the left join keeps groups g5 and g6, which have no label
    assert unmatched["n"].tolist() == [expected_rows["label"].isna().sum()]
    for label in [f"L{i}" for i in range(5)]:
        assert got.loc[label, "total"] == pytest.approx(expected.loc[label, "total"])
        assert got.loc[label, "n"] == expected.loc[label, "n"]
        assert got.loc[label, "groups"] == 1
    # The function's prints, made in Ray Data's map tasks, reach the task log as INFO lines.
    printed = [line for line in "\n".join(capfd.readouterr()).splitlines() if "[stage] modulo_band:" in line]
    assert printed and all("[info" in line for line in printed), printed
    assert sum(int(re.search(r"modulo_band: (\d+) rows", line)[1]) for line in printed) == 1000


def test_select_rename_cast_dedupe_and_outer_join(ray_conn, table, source, staging):
    root, frame = table
    right = extract(staging + "-r", source=str(root), filter="id <= 10", columns=["id", "group"])
    ref, _ = run_operator(
        RayDataTransformOperator(
            task_id="shape",
            input=source,
            staging_uri=staging,
            steps=[
                {"op": "select", "columns": ["id", "group", "price"]},
                {"op": "drop_duplicates", "keys": ["group"], "order_by": "id", "keep": "last"},
                {"op": "rename", "columns": {"group": "grp"}},
                {"op": "cast", "columns": {"price": "int32"}},
                {"op": "join", "right": right, "on": ["id"], "how": "outer"},
            ],
        )
    )
    out = pq.read_table(ref["uri"]).to_pandas()
    last_per_group = frame.sort_values("id").groupby("group").tail(1)
    assert set(out.dropna(subset=["grp"])["id"]) == set(last_per_group["id"])
    assert ref["schema"]["price"] == "int32"
    # the outer join keeps the 10 right-side rows that match nothing on the left
    assert len(out) == len(last_per_group) + len(set(range(1, 11)) - set(last_per_group["id"]))


@pytest.mark.parametrize("keep", ["first", "last"])
def test_drop_duplicates_on_composite_keys_spread_over_files_equals_pandas(ray_conn, tmp_path, staging, keep):
    """Duplicates of a key sit in different files (blocks), so only the shuffle brings them
    together; 3,000 keys, each up to 4 times, with a null in the key for some."""
    rows = 12_000
    frame = pd.DataFrame(
        {
            "order": [i % 1500 for i in range(rows)],
            "line": [None if i % 1000 == 7 else (i // 1500) % 2 for i in range(rows)],
            "version": [(i * 7919) % rows for i in range(rows)],
        }
    )
    frame["line"] = frame["line"].astype("Int64")
    root = tmp_path / "dupes"
    root.mkdir()
    for part in range(4):
        pq.write_table(pa.Table.from_pandas(frame.iloc[part::4], preserve_index=False), root / f"p{part}.parquet")
    ref, _ = run_operator(
        RayDataTransformOperator(
            task_id="dedupe",
            input=extract(staging + "-in", source=str(root)),
            staging_uri=staging,
            steps=[{"op": "drop_duplicates", "keys": ["order", "line"], "order_by": "version", "keep": keep}],
        )
    )
    got = pq.read_table(ref["uri"]).to_pandas()
    expected = frame.sort_values("version").drop_duplicates(["order", "line"], keep=keep)
    assert list(got.columns) == ["order", "line", "version"]  # no helper column left behind
    assert ref["num_rows"] == len(expected) < rows

    def rows_of(table: pd.DataFrame) -> list[list[int]]:
        return sorted(table.fillna(-1).astype("int64").values.tolist())

    assert rows_of(got) == rows_of(expected)


def test_quality_passes_input_on_and_reports(ray_conn, source, staging):
    ref, ti = run_operator(
        RayDataQualityOperator(
            task_id="quality",
            input=source,
            staging_uri=staging,
            checks=[
                {"check": "row_count", "min": 1000, "max": 1000},
                {"check": "unique", "columns": ["id"]},
                {"check": "not_null", "column": "price"},
                {"check": "range", "column": "price", "min": 0, "max": 96},
                {"check": "accepted_values", "column": "group", "values": [f"g{i}" for i in range(7)]},
                {"check": "regex", "column": "group", "pattern": "^g[0-9]$"},
                {"check": "mean", "column": "price", "equal_to": 47, "tolerance": 0.01},
            ],
        )
    )
    assert ref == source  # nothing quarantined: the input reference itself, no copy
    report = ti.xcoms["quality_report"]
    assert report["passed"] and report["num_rows"] == 1000 and len(report["checks"]) == 7
    quarantine = ti.xcoms["quarantine"]
    assert quarantine["num_rows"] == 0 and os.path.exists(f"{quarantine['uri']}/_SUCCESS")
    assert quarantine["schema"]["_failed_checks"] == "list<element: string>"


@pytest.fixture
def planted_refs(tmp_path):
    """The planted-defects dataset and its customer dimension as committed references."""

    def committed(table, name):
        uri = refs.new_attempt_uri(str(tmp_path / name), 1)
        os.makedirs(uri)
        pq.write_table(table.slice(0, 400), f"{uri}/part-0.parquet")
        pq.write_table(table.slice(400), f"{uri}/part-1.parquet")
        return refs.commit(uri, None, ProducedBy()).to_dict()

    return committed(quality_data.planted_table(), "planted"), committed(quality_data.customers_table(), "customers")


def test_quality_on_planted_defects_quarantines_and_fails_listing_every_check(ray_conn, planted_refs, staging):
    planted, customers = planted_refs
    op = RayDataQualityOperator(
        task_id="quality",
        input=planted,
        staging_uri=staging,
        checks=quality_data.planted_checks(customers),
        score_threshold=quality_data.SCORE_THRESHOLD,
    )
    ti = FakeTaskInstance(task_id="quality", previous_xcoms={"quality_report": {"rows_in": 800}})
    with pytest.raises(AirflowFailException) as failure:
        op.execute({"ti": ti, "data_interval_end": datetime.fromisoformat(quality_data.AS_OF)})

    failed = [name for name, (_, ok) in quality_data.EXPECTED.items() if not ok and name not in quality_data.WARN]
    message = str(failure.value)
    assert message.startswith(f"{len(failed)} of {len(quality_data.EXPECTED)} quality checks failed: ")
    assert all(f"{name}: got" in message for name in failed)
    assert "unique(id): got 3, expected = 0 duplicates" in message

    report = ti.xcoms["quality_report"]  # pushed before the task failed
    got = {c["name"]: (c["value"], c["passed"]) for c in report["checks"]}
    for name, (value, passed) in quality_data.EXPECTED.items():
        assert got[name] == ((pytest.approx(value) if isinstance(value, float) else value), passed), name
    assert (report["rows_in"], report["rows_passed"], report["rows_quarantined"]) == (1000, 971, 29)

    quarantine = ti.xcoms["quarantine"]
    bad = pq.read_table(quarantine["uri"])
    assert quarantine["num_rows"] == 29
    assert dict(zip(bad["row"].to_pylist(), bad["_failed_checks"].to_pylist(), strict=True)) == quality_data.QUARANTINED
    (passing,) = [p.parent for p in Path(staging).glob("**/quality/attempt-*/_SUCCESS")]
    rows = pq.read_table(passing).column("row").to_pylist()
    assert sorted(rows) == sorted(set(range(1000)) - set(quality_data.QUARANTINED))


def test_load_modes_never_duplicate_a_rerun(ray_conn, source, tmp_path):
    lake = str(tmp_path / "lake")

    def load(mode, run_id, **kwargs):
        op = RayDataLoadOperator(task_id="load", input=source, destination=lake, mode=mode, **kwargs)
        return run_operator(op, run_id=run_id)[0]

    def lake_rows():
        return pq.read_table(lake).num_rows

    load("append", "run-1")
    load("append", "run-1")  # a retry of the same run replaces its own files
    assert lake_rows() == 1000
    load("append", "run-2")
    assert lake_rows() == 2000
    load("overwrite", "run-3")
    assert lake_rows() == 1000
    lake = str(tmp_path / "partitioned")
    result = load("overwrite_partitions", "run-4", partition_by=["day"])
    assert result["partitions"] == ["day=2024-01-01", "day=2024-01-02"]
    load("overwrite_partitions", "run-5", partition_by=["day"])  # a later run of the same days
    by_day = pq.read_table(lake).to_pandas()
    assert by_day.groupby("day", observed=True).size().to_dict() == {"2024-01-01": 500, "2024-01-02": 500}


def test_missing_input_path_is_named(ray_conn, staging, tmp_path):
    missing = tmp_path / "no-such-dir"
    with pytest.raises(AirflowException, match=f"Source path not found: {missing}"):
        extract(staging, source=str(missing))


def test_unknown_column_in_step_is_named(ray_conn, source, staging):
    op = RayDataTransformOperator(
        task_id="bad", input=source, staging_uri=staging, steps=[{"op": "select", "columns": ["id", "nope"]}]
    )
    with pytest.raises(AirflowException, match="Unknown column 'nope' in step 1 \\(select\\)"):
        run_operator(op)

    assert not list(Path(staging).glob("**/bad/attempt-*"))  # the failed attempt left nothing


def test_user_function_error_reaches_the_task(ray_conn, source, staging):
    op = RayDataTransformOperator(task_id="boom", input=source, fn=always_fails, staging_uri=staging)
    with pytest.raises(AirflowException, match="ValueError: price column looks corrupt in this batch"):
        run_operator(op)


def test_uncommitted_input_is_refused(ray_conn, table, staging, tmp_path):
    half_written = tmp_path / "half"
    half_written.mkdir()
    pq.write_table(pa.table({"id": [1]}), half_written / "part.parquet")
    op = RayDataTransformOperator(
        task_id="t", input=str(half_written), staging_uri=staging, steps=[{"op": "select", "columns": ["id"]}]
    )
    with pytest.raises(AirflowException, match="is not committed"):
        run_operator(op)


def test_rerun_replaces_the_previous_attempt(ray_conn, table, staging):
    root, _ = table
    first = extract(staging, source=str(root))
    second, _ = run_operator(
        RayDataExtractOperator(task_id="extract", staging_uri=staging, source=str(root)), try_number=2
    )

    assert not os.path.exists(first["uri"]) and os.path.exists(f"{second['uri']}/_SUCCESS")

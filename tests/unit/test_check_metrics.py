"""The one-pass check metrics, their merge across batches, and the quarantine split, without Ray:
on data with planted defects (expected results known by construction) and, property-based,
against pandas on random data with nulls."""

import json
import os
from datetime import date

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_provider_raydata.runtime import refs
from airflow_provider_raydata.runtime.check_kinds import (
    CHECKS,
    MEASURES,
    ROW,
    SCHEMA,
    TABLE,
    RowKind,
    SchemaKind,
    TableKind,
)
from airflow_provider_raydata.runtime.checks import (
    FAILED_CHECKS,
    compare,
    measure_batch,
    merge_report,
    prepare_checks,
    reference_keys,
    split_batch,
)
from tests import quality_data


def run_locally(table: pa.Table, checks: list[dict], cuts=(0.07, 0.4, 0.41), score_threshold=None, quarantine=None):
    """What the stage does, batch by batch: measure, merge, then split into passing and quarantined rows."""
    prepared = prepare_checks(checks, table.schema)
    keys = reference_keys(prepared, table.schema, None)  # read once, as the stage does
    bounds = sorted({0, table.num_rows, *(int(c * table.num_rows) for c in cuts)})
    batches = [table.slice(a, b - a) for a, b in zip(bounds, bounds[1:], strict=False)]
    partials = [{k: v[0] for k, v in measure_batch(b, prepared, keys).items()} for b in batches]
    report = merge_report(prepared, partials, table.schema, score_threshold).to_dict()
    if quarantine is None:
        return report, None
    passing = pa.concat_tables([split_batch(b, prepared, quarantine, None, keys) for b in batches])
    return report, passing


@pytest.fixture
def customers_ref(tmp_path):
    uri = refs.new_attempt_uri(str(tmp_path / "customers"), 1)
    os.makedirs(uri)
    pq.write_table(quality_data.customers_table(), f"{uri}/part-0.parquet")
    return refs.commit(uri, None, {})


def test_planted_defects_every_check_and_the_quarantine(tmp_path, customers_ref):
    checks = quality_data.planted_checks(customers_ref, fn="tests.quality_data:not_row_70")
    checks[1]["previous_rows"] = 800  # the operator finds it in the previous successful run
    checks[12]["as_of"] = quality_data.AS_OF  # the operator passes the data interval's end
    table = quality_data.planted_table()
    quarantine = str(tmp_path / "quarantine")
    report, passing = run_locally(table, checks, score_threshold=0.95, quarantine=quarantine)

    got = {c["name"]: (c["value"], c["passed"]) for c in report["checks"]}
    assert got.keys() == quality_data.EXPECTED.keys()
    for name, (value, passed) in quality_data.EXPECTED.items():
        assert got[name][1] == passed, name
        assert got[name][0] == (pytest.approx(value) if isinstance(value, float) else value), name
    by_name = {c["name"]: c for c in report["checks"]}
    assert by_name["accepted_values(kind)"]["examples"] == ["z"]
    assert by_name["regex(email)"]["examples"] == ["not-an-email"]
    assert by_name["referential_integrity(customer)"]["failed_rows"] == 20
    assert by_name["null_count(price)"]["policy"] == "warn"
    assert json.loads(json.dumps(report)) == report  # plain JSON for XCom

    assert (report["rows_in"], report["rows_passed"], report["rows_quarantined"]) == (1000, 971, 29)
    assert report["score"] == pytest.approx(0.969) and not report["passed"]
    bad = pq.read_table(quarantine)
    assert bad.num_rows + passing.num_rows == table.num_rows
    assert dict(zip(bad["row"].to_pylist(), bad[FAILED_CHECKS].to_pylist(), strict=True)) == quality_data.QUARANTINED
    assert set(passing["row"].to_pylist()) == set(range(1000)) - set(quality_data.QUARANTINED)
    assert passing.schema == table.schema and bad.schema.field(FAILED_CHECKS).type == pa.list_(pa.string())


def test_a_row_failing_several_checks_lists_them_all(tmp_path):
    table = pa.table({"x": [1, -5, None], "s": ["ok", "too long", "ok"]})
    checks = [
        {"check": "range", "column": "x", "min": 0},
        {"check": "string_length", "column": "s", "max": 2, "policy": "warn"},
        {"check": "not_null", "column": "x", "quarantine": False},
    ]
    report, passing = run_locally(table, checks, quarantine=str(tmp_path / "q"))
    bad = pq.read_table(tmp_path / "q")
    assert bad.to_pydict() == {"x": [-5], "s": ["too long"], FAILED_CHECKS: [["range(x)", "string_length(s)"]]}
    assert passing.to_pydict() == {"x": [1, None], "s": ["ok", "ok"]}  # quarantine=False only reports
    assert report["score"] == pytest.approx(1 / 3)


def test_clean_data_passes_and_nothing_is_quarantined():
    table = quality_data.planted_table().filter(pa.compute.field("row") > 1000)  # empty, same schema
    checks = [
        {"check": "row_count", "geq_to": 0},
        {"check": "not_null", "column": "email"},
        {"check": "unique", "column": "id"},
        {"check": "null_fraction", "column": "price"},
    ]
    report, _ = run_locally(table, checks)
    assert report["passed"] and report["rows_quarantined"] == 0 and report["score"] == 1.0


def test_comparators_and_tolerance_follow_common_sql():
    assert compare(10, {"geq_to": 10, "less_than": 11})
    assert not compare(10, {"greater_than": 10})
    assert compare(95, {"equal_to": 100}, tolerance=0.05) and not compare(94, {"equal_to": 100}, tolerance=0.05)
    assert compare(104, {"leq_to": 100}, tolerance=0.05)
    assert compare(-104, {"geq_to": -100}, tolerance=0.05)  # the bound widens away from the value
    day = date(2024, 1, 2)
    assert compare(day, {"geq_to": "2024-01-01"}) and not compare(day, {"equal_to": "2024-01-01"})


@pytest.mark.parametrize(
    "check,message",
    [
        ({"check": "mean", "column": "kind", "geq_to": 1}, "column 'kind' has type string; mean applies to number"),
        ({"check": "not_null", "column": "nope"}, r"Unknown column 'nope' in Check 1 \(not_null\(nope\)\)"),
        ({"check": "predicate", "expr": "qty > nope"}, "Unknown column 'nope'"),
    ],
)
def test_the_schema_is_checked_before_any_row_is_read(check, message):
    with pytest.raises(ValueError, match=message):
        prepare_checks([check], quality_data.planted_table().schema)


INTS = st.none() | st.integers(-3, 3)
FLOATS = st.none() | st.floats(-1e6, 1e6, allow_nan=False)
TEXTS = st.none() | st.text(alphabet="ab@.", max_size=4)


@settings(max_examples=150, deadline=None)
@given(rows=st.lists(st.tuples(INTS, FLOATS, TEXTS), max_size=40), cuts=st.lists(st.floats(0, 1), max_size=3))
def test_one_pass_metrics_equal_pandas(rows, cuts):
    i, f, s = (list(col) for col in zip(*rows, strict=True)) if rows else ([], [], [])
    table = pa.table({"i": pa.array(i, pa.int64()), "f": pa.array(f, pa.float64()), "s": pa.array(s, pa.string())})
    frame = pd.DataFrame({"i": pd.array(i, "Int64"), "f": pd.array(f, "Float64"), "s": pd.array(s, "string")})
    checks = [{"check": "row_count", "geq_to": 0}]
    for col in "ifs":
        checks += [
            {"check": "null_count", "column": col},
            {"check": "null_fraction", "column": col},
            {"check": "distinct_count", "column": col, "geq_to": 0},
            {"check": "min", "column": col, "geq_to": "" if col == "s" else -1e9},
            {"check": "max", "column": col, "geq_to": "" if col == "s" else -1e9},
        ]
    for col in "if":
        checks += [{"check": "mean", "column": col, "geq_to": -1e9}, {"check": "sum", "column": col, "geq_to": -1e9}]
    checks += [
        {"check": "unique", "column": "i"},
        {"check": "unique", "columns": ["i", "s"]},
        {"check": "accepted_values", "column": "s", "values": ["a", "ab"]},
        {"check": "regex", "column": "s", "pattern": "^a"},
        {"check": "string_length", "column": "s", "max": 2},
        {"check": "range", "column": "f", "min": -10, "max": 10},
    ]
    report, _ = run_locally(table, checks, cuts=cuts)
    got = {c["name"]: c["value"] for c in report["checks"]}

    def none_if_na(value):
        return None if pd.isna(value) else value

    def fraction(passes: pd.Series) -> float:
        return 1.0 if passes.empty else float(passes.mean())

    expected = {"row_count": len(frame)}
    for col in "ifs":
        expected |= {
            f"null_count({col})": int(frame[col].isna().sum()),
            f"null_fraction({col})": float(frame[col].isna().mean()) if len(frame) else 0.0,
            f"distinct_count({col})": frame[col].nunique(),
            f"min({col})": none_if_na(frame[col].min()),
            f"max({col})": none_if_na(frame[col].max()),
        }
    for col in "if":
        has_values = frame[col].notna().any()
        expected[f"mean({col})"] = float(frame[col].mean()) if has_values else None
        expected[f"sum({col})"] = frame[col].sum() if has_values else None
    texts, floats = frame["s"].dropna(), frame["f"].dropna()
    expected |= {
        "unique(i)": int(frame["i"].dropna().duplicated().sum()),
        "unique(i,s)": int(frame[["i", "s"]].dropna().duplicated().sum()),
        "accepted_values(s)": fraction(texts.isin(["a", "ab"])),
        "regex(s)": fraction(texts.str.startswith("a")),
        "string_length(s)": fraction(texts.str.len() <= 2),
        "range(f)": fraction(floats.between(-10, 10)),
    }
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        if isinstance(value, float):
            assert got[name] == pytest.approx(value, rel=1e-9, abs=1e-6), name
        else:
            assert got[name] == value, name


def test_two_phase_aggregate_matches_pandas():
    from airflow_provider_raydata.runtime.transforms import merge_partials, partial_aggregate

    frame = quality_data.planted_table().to_pandas()
    aggs = [
        ("total", "sum", "price"),
        ("n", "count", None),
        ("avg", "mean", "price"),
        ("kinds", "count_distinct", "kind"),
        ("low", "min", "price"),
        ("high", "max", "price"),
    ]
    frame = frame.assign(bucket=frame["row"] % 4)[["bucket", "row", "price", "kind"]]
    table = pa.Table.from_pandas(frame, preserve_index=False)
    partials = pa.concat_tables([partial_aggregate(table.slice(i, 250), ["bucket"], aggs) for i in range(0, 1000, 250)])
    got = merge_partials(partials, ["bucket"], aggs).to_pandas().set_index("bucket").sort_index()
    expected = frame.groupby("bucket").agg(
        total=("price", "sum"),
        n=("row", "size"),
        avg=("price", "mean"),
        kinds=("kind", "nunique"),
        low=("price", "min"),
        high=("price", "max"),
    )
    pd.testing.assert_frame_equal(got, expected, check_dtype=False, check_names=False)


@settings(max_examples=200, deadline=None)
@given(
    keys=st.lists(st.tuples(st.integers(0, 30), st.sampled_from(["a", "b"])), max_size=60),
    cuts=st.lists(st.integers(0, 60), max_size=5),
    ordered=st.booleans(),
)
def test_distinct_keys_merge_only_shared_ranges_and_stay_exact(keys, cuts, ordered):
    from airflow_provider_raydata.runtime.checks import count_distinct_keys, distinct_rows

    keys = sorted(keys) if ordered else keys  # ordered keys: batches share only boundary values
    bounds = sorted({0, len(keys), *(c for c in cuts if c < len(keys))})
    table = pa.table(
        {"k": [k for k, _ in keys], "s": [s for _, s in keys]},
        schema=pa.schema([("k", pa.int64()), ("s", pa.string())]),
    )
    parts = [distinct_rows(table.slice(a, b - a)) for a, b in zip(bounds, bounds[1:], strict=False)]
    assert count_distinct_keys(parts) == len(set(keys))


def test_every_check_kind_declares_all_it_needs():
    """A kind is one class in runtime.check_kinds: a new one missing a piece, or untested by the
    planted defects above, fails here."""
    needs = {
        ROW: (RowKind, ("passes", "rule")),
        TABLE: (TableKind, ("partial", "merge")),
        SCHEMA: (SchemaKind, ("result",)),
    }
    planted = {c["check"]: c for c in quality_data.planted_checks(customers_ref=None)}
    assert planted.keys() == CHECKS.keys(), "every kind needs a planted defect in tests/quality_data.py"
    for name, kind in CHECKS.items():
        base, methods = needs[kind.level]
        assert isinstance(kind, base), f"{name}: a {kind.level} kind derives from {base.__name__}"
        missing = [m for m in methods if getattr(type(kind), m) is getattr(base, m)]
        assert not missing, f"{name} does not define {missing}"
        assert kind.measures is None if kind.level == SCHEMA else kind.measures in MEASURES, name
        assert not set(kind.required) & set(kind.optional), name
        assert {f for f, _ in kind.aliases} <= set(kind.optional), name
        if kind.level == ROW:
            assert isinstance(kind.rule(planted[name]), str) and kind.rule(planted[name]), name
            assert not kind.on_values or "column" in kind.required, f"{name}: values of which column?"


def test_on_zero_rows_the_counts_decide_and_value_checks_report_no_rows():
    table = quality_data.planted_table().filter(pa.compute.field("row") > 100_000)  # a quiet day
    checks = [
        {"check": "row_count", "geq_to": 1},
        {"check": "distinct_count", "column": "id", "geq_to": 1},
        {"check": "mean", "column": "price", "geq_to": 1},
        {"check": "max", "column": "price", "leq_to": 10},
        {"check": "freshness", "column": "updated_at", "leq_to": "2d", "as_of": quality_data.AS_OF},
        {"check": "unique", "column": "id"},
        {"check": "accepted_values", "column": "kind", "values": ["a"]},
    ]
    report, _ = run_locally(table, checks)
    judged = {c["name"]: (c["passed"], c.get("note")) for c in report["checks"]}
    assert judged == {
        "row_count": (False, None),  # counts are 0 and their bounds decide
        "distinct_count(id)": (False, None),
        "mean(price)": (True, "no rows"),  # nothing to measure: reported, not failed
        "max(price)": (True, "no rows"),
        "freshness(updated_at)": (True, "no rows"),
        "unique(id)": (True, None),  # no row breaks them
        "accepted_values(kind)": (True, None),
    }
    # All nulls is not a quiet day: a mean of nothing still fails there.
    nulls = quality_data.planted_table().slice(5, 1).set_column(3, "price", pa.array([None], pa.float64()))
    report, _ = run_locally(nulls, [{"check": "mean", "column": "price", "geq_to": 1}], cuts=())
    assert not report["passed"]

"""Bad specs fail when the DAG is parsed, before anything reaches a cluster."""

from dataclasses import asdict
from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import AirflowFailException

from airflow_provider_raydata import get_provider_info
from airflow_provider_raydata.contracts import Source
from airflow_provider_raydata.operators import (
    RayDataExtractOperator,
    RayDataQualityOperator,
    RayDataTransformOperator,
)
from airflow_provider_raydata.reporting import format_report
from airflow_provider_raydata.reporting import listed as _listed
from airflow_provider_raydata.runtime.specs import validate_checks, validate_steps
from airflow_provider_raydata.runtime.types import arrow_type
from tests.helpers import FakeTaskInstance

REF = {"uri": "/tmp/x", "num_rows": 1}


@pytest.mark.parametrize(
    "steps,message",
    [
        ([{"op": "explode"}], "Unknown step 'explode' at step 1"),
        ([{"op": "select"}], r"Missing field\(s\) \['columns'\] in step 1 \(select\)"),
        ([{"op": "filter", "expr": "a > 1", "exprs": 1}], r"Unknown field\(s\) \['exprs'\]"),
        ([{"op": "join", "right": REF, "on": ["k"], "how": "cross"}], "Unknown join type 'cross'"),
        ([{"op": "aggregate", "aggs": {"x": ["median", "a"]}}], "Unknown aggregate 'median' for 'x'"),
        ([{"op": "cast", "columns": {"a": "float128"}}], "Unknown Arrow type 'float128'"),
        ([{"op": "map_batches", "fn": "m:f", "output_schema": {"a": "decimal(39)"}}], "Unknown Arrow type"),
        ([{"op": "map_batches", "fn": "m:f", "batch_format": "polars"}], "Unknown batch_format 'polars'"),
    ],
)
def test_bad_steps_fail_at_parse_time(steps, message):
    with pytest.raises(ValueError, match=message):
        RayDataTransformOperator(task_id="t", input=REF, steps=steps)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"on_empty": "ignore"}, "on_empty must be one of continue, skip, fail, not 'ignore'"),
        ({"on_missing": "wait"}, "on_missing must be one of retry, skip, fail, not 'wait'"),
        ({"partition_columns": {"day": "date64[x]"}}, "Unknown Arrow type 'date64\\[x\\]'"),
    ],
)
def test_bad_extract_policies_and_partition_types_fail_at_parse_time(options, message):
    with pytest.raises(ValueError, match=message):
        RayDataExtractOperator(task_id="e", source="/tmp/x.csv", **options)


def test_transform_needs_fn_or_steps():
    with pytest.raises(ValueError, match="give a function"):
        RayDataTransformOperator(task_id="t", input=REF)


def test_fn_runs_before_the_steps():
    op = RayDataTransformOperator(
        task_id="t", input=REF, fn="pkg.mod:fn", batch_size=100, steps=[{"op": "select", "columns": ["a"]}]
    )
    steps = op.all_steps(op.steps, {"k": 1})
    assert steps[0] == {
        "op": "map_batches",
        "fn": "pkg.mod:fn",
        "fn_kwargs": {"k": 1},
        "batch_format": "pandas",
        "batch_size": 100,
    }
    assert steps[1]["op"] == "select"


@pytest.mark.parametrize(
    "check,message",
    [
        ({"check": "freshnes", "column": "a"}, "Unknown check 'freshnes' at position 1; known: row_count"),
        ({"check": "not_null"}, r"Check 1 \(not_null\): missing \['column'\]"),
        ({"check": "range", "column": "a"}, "needs 'min', 'max' or both"),
        ({"check": "unique", "columns": ["a"], "colums": 1}, r"unknown field\(s\) \['colums'\]"),
        ({"check": "unique"}, "give 'column' or 'columns'"),
        ({"check": "mean", "column": "a"}, r"Check 1 \(mean\(a\)\) needs a comparator"),
        ({"check": "regex", "column": "a", "pattern": "x", "geq_to": 5}, "geq_to 5 does not apply: regex measures a"),
        ({"check": "null_count", "column": "a", "equal_to": -1}, "equal_to -1 does not apply"),
        ({"check": "schema", "columns": {"a": "int64"}, "equal_to": 1}, "'equal_to' does not apply to a schema check"),
        ({"check": "schema", "columns": {"a": "int65"}}, "Unknown Arrow type 'int65'"),
        ({"check": "min", "column": "a", "geq_to": "2024-01-01", "tolerance": 0.1}, "tolerance applies to numeric"),
        ({"check": "row_count", "min": 1, "geq_to": 2}, "either min/max or comparators"),
        ({"check": "freshness", "column": "a", "leq_to": "3 weeks"}, "Not a duration: '3 weeks'"),
        ({"check": "not_null", "column": "a", "policy": "ignore"}, "policy must be one of fail, warn"),
        ({"check": "predicate", "expr": "a >"}, "Invalid expression 'a >'"),
        ({"check": "sum", "column": "a", "tolerance": 0.1}, "needs a comparator"),
    ],
)
def test_bad_checks_fail_at_parse_time(check, message):
    with pytest.raises(ValueError, match=message):
        RayDataQualityOperator(task_id="q", input=REF, checks=[check])


def test_two_checks_with_one_name_need_names():
    checks = [{"check": "regex", "column": "a", "pattern": "x"}, {"check": "regex", "column": "a", "pattern": "y"}]
    with pytest.raises(ValueError, match=r"Check 2 \(regex\(a\)\): another check has the same name"):
        validate_checks(checks)


TYPED_REF = {"uri": "/tmp/x", "num_rows": 1, "schema": {"id": "int64", "name": "large_string", "day": "date32[day]"}}


@pytest.mark.parametrize(
    "check,message",
    [
        ({"check": "not_null", "column": "nme"}, r"Unknown column 'nme' in Check 1 \(not_null\(nme\)\); available"),
        ({"check": "predicate", "expr": "idd > 0"}, "Unknown column 'idd' in Check 1 \\(predicate"),
        ({"check": "max", "column": "id", "where": "x > 1", "leq_to": 1}, "Unknown column 'x'"),
        ({"check": "mean", "column": "name", "geq_to": 1}, "column 'name' has type large_string; mean applies to"),
        ({"check": "freshness", "column": "id", "leq_to": "1d"}, "freshness applies to time columns"),
        ({"check": "regex", "column": "day", "pattern": "x"}, "regex applies to string columns"),
    ],
)
def test_columns_are_checked_against_a_known_schema_before_the_cluster(check, message):
    with pytest.raises(ValueError, match=message):  # a static input: at parse time
        RayDataQualityOperator(task_id="q", input=TYPED_REF, checks=[check])
    op = RayDataQualityOperator(task_id="q", input="{{ ti.xcom_pull('t') }}", checks=[check])
    op.input = TYPED_REF  # as rendered from XCom: at execute time, before the stage is sent
    with pytest.raises(AirflowFailException, match=message):
        op.stage_fields({"ti": FakeTaskInstance()})


def test_templated_values_are_checked_once_rendered():
    check = {"check": "predicate", "expr": "id > {{ params.low }}", "geq_to": "{{ params.share }}"}
    RayDataQualityOperator(task_id="q", input=TYPED_REF, checks=[check])


def test_quality_spec_carries_run_context():
    from datetime import UTC, datetime

    checks = [
        {"check": "row_count_change", "equal_to": 1, "tolerance": 0.3},
        {"check": "freshness", "column": "day", "leq_to": "2d"},
        {"check": "referential_integrity", "column": "id", "ref": '{"uri": "/tmp/other"}'},
    ]
    op = RayDataQualityOperator(task_id="q", input=TYPED_REF, checks=checks, score_threshold=0.9)
    ti = FakeTaskInstance(task_id="q", previous_xcoms={"quality_report": {"rows_in": 800}})
    end = datetime(2024, 1, 2, tzinfo=UTC)
    spec = op.stage_fields({"ti": ti, "data_interval_end": end})
    assert spec["checks"][0]["previous_rows"] == 800
    assert spec["checks"][1]["as_of"] == "2024-01-02T00:00:00+00:00"
    assert spec["checks"][2]["ref"] == {"uri": "/tmp/other"}
    assert spec["score_threshold"] == 0.9 and "previous_rows" not in checks[0]  # the operator's own spec is kept
    manual = op.stage_fields({"ti": FakeTaskInstance(), "dag_run": SimpleNamespace(run_after=end)})
    assert manual["checks"][0]["previous_rows"] is None and manual["checks"][1]["as_of"] == end.isoformat()


def test_extract_builds_a_file_source_spec():
    op = RayDataExtractOperator(task_id="e", source="s3://raw/{{ ds }}/*.csv", columns=["a"], filter="a > 1")
    assert op.stage_fields({}) == {
        "source": Source.from_user(
            {"kind": "files", "path": "s3://raw/{{ ds }}/*.csv", "columns": ["a"], "filter": "a > 1"}
        )
    }
    assert "source" in op.template_fields and "filter" in op.template_fields


def test_valid_specs_pass():
    validate_steps([{"op": "aggregate", "by": ["a"], "aggs": {"n": ["count"], "s": ["sum", "b"]}}])
    validate_checks([{"check": "row_count", "min": 1}, {"check": "regex", "column": "a", "pattern": "^x"}])
    validate_checks([{"check": "mean", "column": "a", "equal_to": 10, "tolerance": 0.05, "policy": "warn"}])


def test_arrow_type_names():
    assert str(arrow_type("decimal128(15, 2)")) == "decimal128(15, 2)"
    assert str(arrow_type("timestamp[us, tz=UTC]")) == "timestamp[us, tz=UTC]"
    assert str(arrow_type("float64")) == "double"


def test_report_table_is_readable():
    report = {
        "rows_in": 10,
        "rows_passed": 7,
        "rows_quarantined": 3,
        "score": 0.7,
        "checks": [
            {
                "name": "not_null(a)",
                "value": 0.7,
                "expected": "pass fraction = 1: not null",
                "passed": False,
                "policy": "fail",
                "failed_rows": 3,
                "evaluated_rows": 10,
            },
            {"name": "mean(b)", "value": 2.5, "expected": ">= 3", "passed": False, "policy": "warn"},
        ],
    }
    lines = format_report(report).splitlines()
    assert lines[0].split() == ["check", "value", "expected", "policy", "result"]
    assert lines[1].split()[:6] == ["not_null(a)", "0.7", "(3", "of", "10", "rows"]
    assert lines[1].endswith("fail    FAIL")
    assert lines[2].split() == ["mean(b)", "2.5", ">=", "3", "warn", "WARN"]
    assert lines[3] == "rows in 10 = passed 7 + quarantined 3; quality score 0.7000"


def test_a_bulk_loads_partitions_are_summarised_in_the_task_log():
    days = [f"day-{n:04d}" for n in range(2526)]  # SF1 lineitem's l_shipdate values
    assert _listed(days) == "2526: day-0000, day-0001, day-0002, day-0003, day-0004, ..., " + ", ".join(days[-5:])
    assert _listed(["2024-01-02"]) == "2024-01-02" and _listed([]) == "-"


def test_provider_info_declares_the_connection_type():
    info = get_provider_info()
    conn = info["connection-types"][0]
    assert conn["connection-type"] == "raydata"
    assert conn["hook-class-name"] == "airflow_provider_raydata.hooks.ray.RayHook"
    assert {"namespace", "runtime_env", "dashboard_url", "staging_uri"} <= set(conn["conn-fields"])
    assert "password" in conn["ui-field-behaviour"]["relabeling"]


def test_incremental_window_by_interval_watermark_fallback_and_empty_interval():
    from datetime import UTC, datetime

    import pytest
    from airflow.sdk.exceptions import AirflowFailException

    from airflow_provider_raydata.operators import RayDataExtractOperator

    op = RayDataExtractOperator(task_id="e", source="/tmp/x", incremental={"column": "updated_at"})
    day, next_day = datetime(2024, 1, 2, tzinfo=UTC), datetime(2024, 1, 3, tzinfo=UTC)
    window = asdict(op.window({"data_interval_start": day, "data_interval_end": next_day}))
    assert window == {
        "column": "updated_at",
        "start": "2024-01-02T00:00:00+00:00",
        "end": "2024-01-03T00:00:00+00:00",
        "partitioned": False,
    }
    with pytest.raises(AirflowFailException, match="zero-length intervals"):
        op.window({"data_interval_start": day, "data_interval_end": day})
    with pytest.raises(AirflowFailException, match="no data interval"):
        op.window({})
    with pytest.raises(ValueError, match="needs 'watermark'"):
        RayDataExtractOperator(task_id="w", source="/tmp/x", incremental={"column": "c", "mode": "watermark"})

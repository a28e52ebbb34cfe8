"""Bad specs fail when the DAG is parsed, before anything reaches a cluster."""

import pytest

from airflow_provider_raydata import get_provider_info
from airflow_provider_raydata.operators import (
    RayDataExtractOperator,
    RayDataQualityOperator,
    RayDataTransformOperator,
)
from airflow_provider_raydata.operators.raydata import format_report
from airflow_provider_raydata.runtime.specs import validate_checks, validate_steps
from airflow_provider_raydata.runtime.types import arrow_type

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
    ],
)
def test_bad_steps_fail_at_parse_time(steps, message):
    with pytest.raises(ValueError, match=message):
        RayDataTransformOperator(task_id="t", input=REF, steps=steps)


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
    "checks,message",
    [
        ([{"check": "freshness"}], "Unknown check 'freshness'"),
        ([{"check": "not_null"}], r"Check 1 \(not_null\): missing \['column'\]"),
        ([{"check": "range", "column": "a"}], "needs 'min', 'max' or both"),
        ([{"check": "unique", "columns": ["a"], "colums": 1}], r"unknown field\(s\) \['colums'\]"),
    ],
)
def test_bad_checks_fail_at_parse_time(checks, message):
    with pytest.raises(ValueError, match=message):
        RayDataQualityOperator(task_id="q", input=REF, checks=checks)


def test_extract_builds_a_file_source_spec():
    op = RayDataExtractOperator(task_id="e", source="s3://raw/{{ ds }}/*.csv", columns=["a"], filter="a > 1")
    assert op.stage_spec({}) == {
        "source": {"kind": "files", "path": "s3://raw/{{ ds }}/*.csv", "columns": ["a"], "filter": "a > 1"}
    }
    assert "source" in op.template_fields and "filter" in op.template_fields


def test_valid_specs_pass():
    validate_steps([{"op": "aggregate", "by": ["a"], "aggs": {"n": ["count"], "s": ["sum", "b"]}}])
    validate_checks([{"check": "row_count", "min": 1}, {"check": "regex", "column": "a", "pattern": "^x"}])


def test_arrow_type_names():
    assert str(arrow_type("decimal128(15, 2)")) == "decimal128(15, 2)"
    assert str(arrow_type("timestamp[us, tz=UTC]")) == "timestamp[us, tz=UTC]"
    assert str(arrow_type("float64")) == "double"


def test_report_table_is_readable():
    text = format_report({"checks": [{"name": "not_null(a)", "value": 3, "expected": "0 nulls", "passed": False}]})
    assert text.splitlines()[1].split() == ["not_null(a)", "3", "0", "nulls", "FAIL"]


def test_provider_info_declares_the_connection_type():
    info = get_provider_info()
    conn = info["connection-types"][0]
    assert conn["connection-type"] == "raydata"
    assert conn["hook-class-name"] == "airflow_provider_raydata.hooks.ray.RayHook"
    assert {"namespace", "runtime_env", "dashboard_url", "staging_uri"} <= set(conn["conn-fields"])
    assert "password" in conn["ui-field-behaviour"]["relabeling"]

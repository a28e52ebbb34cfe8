"""``run_stage(spec)``: one stage's Ray Data pipeline. Runs on the cluster, in a ``StageProcess``
of the ``StageExecutor`` (``runtime.executor``).

The spec (``contracts.StageSpec``) is plain data built by an operator; the result
(``contracts.StageResult``) holds dataset references and metrics, never rows.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import ray.data
from ray.data.context import DataContext, ShuffleStrategy

from ..contracts import DataError, DatasetRef, Metrics, StageResult, StageSpec
from . import refs
from .errors import root_cause
from .lake import write_lake
from .output import write_output
from .quality import run_quality
from .retention import clean_staging
from .sources import read_ref, read_source, unreadable_file
from .transforms import apply_steps, apply_steps_here, steps_schema
from .tuning import DEFAULT_TUNING

log = logging.getLogger("airflow_provider_raydata.stage")
# Loads published in a transaction still open, by stage id: their Airflow task commits them once
# it holds the result (a task killed before that publishes nothing). Values: commit(True/False).
HELD_LOADS: dict[str, Callable[[bool], None]] = {}


def configure(tuning: dict[str, Any] | None) -> dict[str, Any]:
    settings = {**DEFAULT_TUNING, **(tuning or {})}
    os.environ["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"] = str(settings["parquet_footer_actors"])
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.shuffle_strategy = ShuffleStrategy(settings["shuffle_strategy"])
    ctx.enable_arrow_backed_pandas_conversion = settings["arrow_backed_pandas"]
    ctx.use_datasource_v2 = settings["parquet_reader_v2"]
    return settings


def run_stage(spec: StageSpec) -> StageResult:
    """Run one stage; its metrics' seconds cover the whole stage on the cluster."""
    started = time.perf_counter()
    settings = configure(spec.tuning)
    result = RUNNERS[spec.stage](spec, settings)
    seconds = round(time.perf_counter() - started, 3)
    return replace(result, metrics=replace(result.metrics, seconds=seconds))


def _cleanup(spec: StageSpec, settings: dict) -> StageResult:
    """Staging retention: no dataset, only a listing and deletes."""
    c = spec.cleanup
    summary = clean_staging(
        c.staging_uri,
        spec.storage,
        c.older_than_days,
        c.active_runs,
        now=c.now,
        dry_run=c.dry_run,
        lake_paths=c.lake_paths,
        candidates=c.candidates,
    )
    return StageResult(spec.stage, Metrics(None, None, 0.0), cleanup=summary)


def _extract(spec: StageSpec, settings: dict) -> StageResult:
    try:
        ds, schema = read_source(spec.source, spec.storage)
        ref = write_output(ds, spec, settings["min_rows_per_file"], schema=schema)
    except Exception as exc:
        if root_cause(exc).startswith(("ArrowInvalid", "ArrowTypeError")) and (
            bad := unreadable_file(spec.source, spec.storage)
        ):
            raise DataError(f"Cannot parse {bad}") from exc  # the file, which Ray Data's error does not name
        raise
    return StageResult(spec.stage, Metrics(None, ref.num_rows, 0.0), ref=ref)


def _transform(spec: StageSpec, settings: dict) -> StageResult:
    ds, source = read_ref(spec.input, spec.storage)
    input_schema = refs.arrow_schema(source, spec.storage)
    if source.num_rows == 0:  # Ray Data calls no function on an empty block: its columns come from here
        table = apply_steps_here(input_schema.empty_table(), list(spec.steps), spec.storage)
        ds, schema = ray.data.from_arrow(table), table.schema
    else:
        ds = apply_steps(ds, spec.steps, spec.storage, rows_hint=source.num_rows)
        schema = functools.partial(steps_schema, input_schema, list(spec.steps), spec.storage)
    ref = write_output(ds, spec, settings["min_rows_per_file"], schema=schema)
    report_type_changes(source, ref)
    return StageResult(spec.stage, Metrics(source.num_rows, ref.num_rows, 0.0), ref=ref, input=source)


def report_type_changes(before: DatasetRef, after: DatasetRef) -> None:
    """Log the columns whose type the steps changed: a change is visible in the task log."""
    for name, type_name in after.schema.items():
        if before.schema.get(name, type_name) != type_name:
            log.info("Column %r changed type: %s -> %s", name, before.schema[name], type_name)


def _quality(spec: StageSpec, settings: dict) -> StageResult:
    ds, source = read_ref(spec.input, spec.storage)
    report, ref, quarantine = run_quality(ds, source, spec, settings["min_rows_per_file"])
    metrics = Metrics(source.num_rows, ref.num_rows, 0.0)
    return StageResult(spec.stage, metrics, ref=ref, input=source, report=report, quarantine=quarantine)


def _load(spec: StageSpec, settings: dict) -> StageResult:
    ds, source = read_ref(spec.input, spec.storage)
    destination = spec.destination
    if destination.kind == "snowflake":  # staged here, published by the task (hooks.snowflake)
        from .snowflake.staging import copy_to_staging  # the Snowflake connector is an optional extra

        plan = copy_to_staging(ds, destination, spec.load_id)
        return StageResult(spec.stage, Metrics(source.num_rows, plan.rows_written, 0.0), input=source, staged=plan)
    held = False
    if destination.kind == "parquet":
        load = write_lake(ds, destination, spec.storage, spec.load_id)
    elif destination.kind == "postgres":
        from .postgres.load import load_held  # psycopg is an optional extra

        # COPYs straight from the committed files (no Ray Data pipeline in between), published in
        # a transaction left open: the task commits it (commit_held_load) once it has this result.
        load, HELD_LOADS[spec.stage_id] = load_held(source.uri, spec.storage, destination, spec.load_id)
        held = True
    else:  # BigQuery's load jobs read the committed files themselves (hooks.bigquery)
        raise DataError(f"A {destination.kind} load runs no stage on the cluster")
    metrics = Metrics(source.num_rows, load.rows_written, 0.0)
    return StageResult(spec.stage, metrics, input=source, load=load, held=held)


RUNNERS: dict[str, Callable[[StageSpec, dict], StageResult]] = {
    "extract": _extract,
    "transform": _transform,
    "quality": _quality,
    "load": _load,
    "cleanup": _cleanup,
}


def commit_held_load(stage_id: str, commit: bool) -> None:
    """Commit (or roll back) the transaction a load stage of this process left open."""
    HELD_LOADS.pop(stage_id)(commit)

"""``run_stage(spec)``: one stage's Ray Data pipeline. Runs on the cluster, in a ``StageProcess``
of the ``StageExecutor`` (``runtime.executor``).

The spec (``contracts.StageSpec``) is plain data built by an operator; the result
(``contracts.StageResult``) holds dataset references and metrics, never rows.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from ray.data.context import DataContext, ShuffleStrategy

from ..contracts import DataError, Metrics, StageResult, StageSpec
from .lake import write_lake
from .output import write_output
from .quality import run_quality
from .retention import clean_staging
from .sources import read_ref, read_source
from .transforms import apply_steps
from .tuning import DEFAULT_TUNING

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
    started = time.perf_counter()
    settings = configure(spec.tuning)
    storage = spec.storage

    def metrics(rows_in: int | None, rows_out: int | None) -> Metrics:
        return Metrics(rows_in, rows_out, round(time.perf_counter() - started, 3))

    if spec.stage == "cleanup":  # staging retention: no dataset, only a listing and deletes
        c = spec.cleanup
        summary = clean_staging(
            c.staging_uri,
            storage,
            c.older_than_days,
            c.active_runs,
            now=c.now,
            dry_run=c.dry_run,
            lake_paths=c.lake_paths,
            candidates=c.candidates,
        )
        return StageResult(spec.stage, metrics(None, None), cleanup=summary)
    if spec.stage == "extract":
        ds = read_source(spec.source, storage)
        ref = write_output(ds, spec, settings["min_rows_per_file"])
        return StageResult(spec.stage, metrics(None, ref.num_rows), ref=ref)
    ds, source = read_ref(spec.input, storage)
    if spec.stage == "transform":
        ds = apply_steps(ds, spec.steps, storage, rows_hint=source.num_rows)
        ref = write_output(ds, spec, settings["min_rows_per_file"])
        return StageResult(spec.stage, metrics(source.num_rows, ref.num_rows), ref=ref, input=source)
    if spec.stage == "quality":
        report, ref, quarantine = run_quality(ds, source, spec, settings["min_rows_per_file"])
        return StageResult(
            spec.stage,
            metrics(source.num_rows, ref.num_rows),
            ref=ref,
            input=source,
            report=report,
            quarantine=quarantine,
        )
    destination = spec.destination
    if destination.kind == "snowflake":  # staged here, published by the task (hooks.snowflake)
        from .snowflake.staging import copy_to_staging  # the Snowflake connector is an optional extra

        plan = copy_to_staging(ds, destination, spec.load_id)
        return StageResult(spec.stage, metrics(source.num_rows, plan.rows_written), input=source, staged=plan)
    if destination.kind == "parquet":
        load = write_lake(ds, destination, spec.storage, spec.load_id)
    elif destination.kind == "postgres":
        from .postgres.load import load_held  # psycopg is an optional extra

        # COPYs straight from the committed files (no Ray Data pipeline in between), published in
        # a transaction left open: the task commits it (commit_held_load) once it has this result.
        load, HELD_LOADS[spec.stage_id] = load_held(source.uri, spec.storage, destination, spec.load_id)
    else:  # BigQuery's load jobs read the committed files themselves (hooks.bigquery)
        raise DataError(f"A {destination.kind} load runs no stage on the cluster")
    held = spec.stage_id in HELD_LOADS
    return StageResult(spec.stage, metrics(source.num_rows, load.rows_written), input=source, load=load, held=held)


def commit_held_load(stage_id: str, commit: bool) -> None:
    """Commit (or roll back) the transaction a load stage of this process left open."""
    HELD_LOADS.pop(stage_id)(commit)

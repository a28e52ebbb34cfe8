"""``run_stage(spec)``: one stage's Ray Data pipeline, run on the cluster.

The spec is plain data built by the operators; the result is a small dict: a dataset
reference and metrics, never rows. The Airflow side calls it through the Ray Client on the
cluster's ``StageExecutor`` (``runtime.executor``); ``python -m
airflow_provider_raydata.runtime.runner SPEC.json`` runs the same function as a job entrypoint.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data.context import DataContext, ShuffleStrategy

from . import refs
from .checks import quarantine_schema, run_checks, split_batch
from .retention import clean_staging
from .sinks import write_destination
from .sources import read_ref, read_source
from .storage import exists, filesystem_for, join_uri
from .transforms import apply_steps

DEFAULT_TUNING = {
    # Each read_parquet otherwise starts 32 footer-reading actors: seconds of fixed cost per read.
    "parquet_footer_actors": 1,
    # Sort-based shuffles run as tasks; the hash shuffle starts aggregator actors (seconds each time).
    "shuffle_strategy": "sort_shuffle_pull_based",
    # Plain numpy-backed pandas batches: with pandas 3 Arrow-backed batches simple arithmetic
    # such as ``df["id"] % 10`` raises NotImplementedError.
    "arrow_backed_pandas": False,
    "min_rows_per_file": 1_000_000,
    # The V2 Parquet reader starts footer-reading actors on every read: 3-7 s per read measured
    # here against 0.2 s for the V1 reader on small inputs.
    "parquet_reader_v2": False,
}


# Loads published in a transaction still open, by stage id: their Airflow task commits them once
# it holds the result (a task killed before that publishes nothing).
AWAITING_COMMIT: dict[str, Callable[[bool], None]] = {}


def configure(tuning: dict[str, Any] | None) -> dict[str, Any]:
    settings = {**DEFAULT_TUNING, **(tuning or {})}
    os.environ["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"] = str(settings["parquet_footer_actors"])
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.shuffle_strategy = ShuffleStrategy(settings["shuffle_strategy"])
    ctx.enable_arrow_backed_pandas_conversion = settings["arrow_backed_pandas"]
    ctx.use_datasource_v2 = settings["parquet_reader_v2"]
    return settings


def run_stage(spec: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    settings = configure(spec.get("tuning"))
    stage, storage = spec["stage"], spec.get("storage")
    result: dict[str, Any] = {"stage": stage}
    rows_in = None
    if stage == "cleanup":  # staging retention: no dataset, only a listing and deletes
        result["cleanup"] = run_cleanup(spec)
        result["metrics"] = {"rows_in": None, "rows_out": None, "seconds": round(time.perf_counter() - started, 3)}
        return result
    if stage == "extract":
        ds = read_source(spec["source"], storage)
    else:
        ds, input_meta = read_ref(spec["input"], storage)
        rows_in = input_meta.get("num_rows")
        result["input"] = input_meta
    if stage == "transform":
        ds = apply_steps(ds, spec["steps"], storage, rows_hint=rows_in)
    elif stage == "quality":
        result.update(run_quality(ds, input_meta, spec, storage, settings["min_rows_per_file"]))
    elif stage == "load":
        result["load"] = write_destination(ds, spec["destination"], storage, spec["load_id"], input_meta["uri"])
        finish = result["load"].pop("finish", None)
        if finish is not None:  # published in a transaction left open: see finish_stage
            AWAITING_COMMIT[spec.get("stage_id", "")] = finish
            result["awaiting_commit"] = True
    if stage in ("extract", "transform"):
        result["ref"] = write_output(ds, spec, storage, settings["min_rows_per_file"])
    out = result.get("ref") or {}
    result["metrics"] = {
        "rows_in": rows_in,
        "rows_out": out["num_rows"] if "num_rows" in out else (result.get("load") or {}).get("rows_written"),
        "seconds": round(time.perf_counter() - started, 3),
    }
    return result


def finish_stage(stage_id: str, commit: bool) -> None:
    """Commit (or roll back) the transaction a load stage of this process left open."""
    AWAITING_COMMIT.pop(stage_id)(commit)


def run_cleanup(spec: dict[str, Any]) -> dict[str, Any]:
    return clean_staging(
        spec["staging_uri"],
        spec.get("storage"),
        spec["older_than_days"],
        spec.get("active_runs") or [],
        now=spec.get("now"),
        dry_run=bool(spec.get("dry_run")),
        lake_paths=spec.get("lake_paths") or [],
        candidates=spec.get("candidates"),
    )


def run_quality(
    ds: ray.data.Dataset,
    input_meta: dict,
    spec: dict,
    storage: dict | None,
    min_rows_per_file: int,
) -> dict:
    """Measure every check in one pass. Without quarantined rows the output is the input
    reference itself; otherwise a second pass writes the passing rows to the output and the
    failing rows to the quarantine. Both are committed references, and rows in always equal
    rows passed + rows quarantined (verified on the committed files)."""
    report, checks = run_checks(ds, spec["checks"], storage, spec.get("score_threshold"))
    schema = ds.schema().base_schema
    quarantine = refs.new_attempt_uri(join_uri(spec["output_uri"], "quarantine"), spec.get("try_number", 1))
    fs, path = filesystem_for(quarantine, storage)
    try:
        ref = input_meta
        if report["rows_quarantined"]:
            passing = ds.map_batches(
                split_batch,
                batch_format="pyarrow",
                batch_size=None,
                zero_copy_batch=True,
                fn_kwargs={"checks": checks, "quarantine_uri": quarantine, "storage": storage},
            )
            ref = write_output(passing, spec, storage, min_rows_per_file, schema=schema)
        write_empty_if_needed(fs, path, quarantine_schema(schema))
        quarantine_ref = refs.commit(quarantine, storage, spec.get("produced_by", {}))
    except BaseException:
        if exists(fs, path):
            fs.delete_dir(path)
        raise
    if (ref["num_rows"], quarantine_ref["num_rows"]) != (report["rows_passed"], report["rows_quarantined"]):
        raise RuntimeError(
            f"quality split does not add up: {report['rows_in']} rows in, {ref['num_rows']} written as passing "
            f"and {quarantine_ref['num_rows']} as quarantined (expected {report['rows_passed']} and "
            f"{report['rows_quarantined']}); is a custom check function non-deterministic?"
        )
    return {"report": report, "ref": ref, "quarantine": quarantine_ref}


def write_empty_if_needed(fs, path: str, schema: pa.Schema) -> None:
    """An empty result still carries its schema: one empty Parquet file."""
    if not refs.data_files(fs, path):
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(f"{path}/empty.parquet") as out:
            pq.write_table(schema.empty_table(), out)


def write_output(
    ds: ray.data.Dataset,
    spec: dict,
    storage: dict | None,
    min_rows_per_file: int,
    schema: pa.Schema | None = None,
) -> dict:
    """Write to a fresh attempt directory and commit it; never leave a half-written attempt.
    ``schema``: the schema of an empty result (otherwise asked from ``ds``, which may run part of it)."""
    attempt = refs.new_attempt_uri(spec["output_uri"], spec.get("try_number", 1))
    fs, path = filesystem_for(attempt, storage)
    try:
        ds.write_parquet(path, filesystem=fs, min_rows_per_file=min_rows_per_file)
        if schema is None and not refs.data_files(fs, path):
            found = ds.schema()
            schema = found.base_schema if found is not None else pa.schema([])
        write_empty_if_needed(fs, path, schema)
        return refs.commit(attempt, storage, spec.get("produced_by", {}))
    except BaseException:
        if exists(fs, path):
            fs.delete_dir(path)
        raise


if __name__ == "__main__":  # Ray Jobs entrypoint: python -m ...runtime.runner spec.json
    with open(sys.argv[1]) as handle:
        job_spec = json.load(handle)
    job_result = run_stage(job_spec)
    if job_result.get("awaiting_commit"):  # no Airflow task to wait for: the job's success is the word
        finish_stage(job_spec.get("stage_id", ""), True)
    print(json.dumps(job_result, default=str))

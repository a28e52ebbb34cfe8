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
from .checks import run_checks
from .sinks import write_destination
from .sources import read_ref, read_source
from .storage import exists, filesystem_for
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


def configure(tuning: dict[str, Any] | None) -> dict[str, Any]:
    settings = {**DEFAULT_TUNING, **(tuning or {})}
    os.environ["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"] = str(settings["parquet_footer_actors"])
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.shuffle_strategy = ShuffleStrategy(settings["shuffle_strategy"])
    ctx.enable_arrow_backed_pandas_conversion = settings["arrow_backed_pandas"]
    ctx.use_datasource_v2 = settings["parquet_reader_v2"]
    return settings


class StageCancelled(RuntimeError):
    pass


def run_stage(spec: dict[str, Any], cancelled: Callable[[], bool] = lambda: False) -> dict[str, Any]:
    started = time.perf_counter()
    settings = configure(spec.get("tuning"))
    stage, storage = spec["stage"], spec.get("storage")
    result: dict[str, Any] = {"stage": stage}
    rows_in = None
    if stage == "extract":
        ds = read_source(spec["source"], storage)
    else:
        ds, input_meta = read_ref(spec["input"], storage)
        rows_in = input_meta.get("num_rows")
        result["input"] = input_meta
    if stage == "transform":
        ds = apply_steps(ds, spec["steps"], storage, rows_hint=rows_in)
    elif stage == "quality":
        result["report"] = run_checks(ds, spec["checks"])
        result["ref"] = input_meta
    elif stage == "load":
        result["load"] = write_destination(ds, spec["destination"], storage, spec["load_id"])
    if stage in ("extract", "transform"):
        result["ref"] = write_output(ds, spec, storage, settings["min_rows_per_file"], cancelled)
    result["metrics"] = {
        "rows_in": rows_in,
        "rows_out": (result.get("ref") or {}).get("num_rows") or (result.get("load") or {}).get("rows_written"),
        "seconds": round(time.perf_counter() - started, 3),
    }
    return result


def write_output(
    ds: ray.data.Dataset,
    spec: dict,
    storage: dict | None,
    min_rows_per_file: int,
    cancelled: Callable[[], bool] = lambda: False,
) -> dict:
    """Write to a fresh attempt directory and commit it; never leave a half-written attempt."""
    attempt = refs.new_attempt_uri(spec["output_uri"], spec.get("try_number", 1))
    fs, path = filesystem_for(attempt, storage)
    try:
        ds.write_parquet(path, filesystem=fs, min_rows_per_file=min_rows_per_file)
        if not refs.data_files(fs, path):  # keep the schema of an empty result
            schema = ds.schema()
            empty = schema.base_schema if schema is not None else pa.schema([])
            fs.create_dir(path, recursive=True)
            with fs.open_output_stream(f"{path}/empty.parquet") as out:
                pq.write_table(empty.empty_table(), out)
        if cancelled():  # the Airflow task was killed while the data was being written
            raise StageCancelled(f"stage {spec.get('stage_id')} was cancelled before its commit")
        return refs.commit(attempt, storage, spec.get("produced_by", {}))
    except BaseException:
        if exists(fs, path):
            fs.delete_dir(path)
        raise


if __name__ == "__main__":  # Ray Jobs entrypoint: python -m ...runtime.runner spec.json
    with open(sys.argv[1]) as handle:
        print(json.dumps(run_stage(json.load(handle)), default=str))

"""Writers. The Parquet lake writer replaces exactly what a rerun wrote before.

    {"kind": "parquet", "path": "s3://lake/revenue", "partition_by": ["order_date"],
     "mode": "append" | "overwrite" | "overwrite_partitions"}

Files are first written to ``{path}/_staging/{load_id}-{token}/`` and moved into place only when
the whole write succeeded. Every file a load publishes is named after its ``load_id`` (one per
DAG run and task; a hex digest), so a retry or rerun of that load first removes its own earlier files: append
never duplicates a run's rows. On object stores the moves are per-file copies, so readers may
briefly see a partition mid-swap; a table format (Iceberg, Delta) is the fix for that.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pyarrow.fs as pafs
import ray.data
from ray.data.datasource import FilenameProvider

from .refs import describe_files
from .storage import exists, filesystem_for, join_uri

LAKE_MODES = ("append", "overwrite", "overwrite_partitions")
STAGING_DIR = "_staging"


def write_destination(
    ds: ray.data.Dataset, destination: dict[str, Any], storage: dict | None, load_id: str
) -> dict[str, Any]:
    kind = destination.get("kind", "parquet")
    if kind not in WRITERS:
        raise ValueError(f"Unknown destination kind {kind!r}; known kinds: {', '.join(WRITERS)}")
    return WRITERS[kind](ds, destination, storage, load_id)


def write_lake(ds: ray.data.Dataset, destination: dict, storage: dict | None, load_id: str) -> dict:
    mode = destination.get("mode", "append")
    if mode not in LAKE_MODES:
        raise ValueError(f"Unknown mode {mode!r} for a Parquet destination; use {', '.join(LAKE_MODES)}")
    partition_by = list(destination.get("partition_by") or [])
    if mode == "overwrite_partitions" and not partition_by:
        raise ValueError("mode 'overwrite_partitions' needs 'partition_by'")
    schema = ds.schema()
    if schema is not None:
        missing = [c for c in partition_by if c not in schema.names]
        if missing:
            raise ValueError(f"Unknown partition column {missing[0]!r}; available columns: {schema.names}")
    fs, root = filesystem_for(destination["path"], storage)
    staged = join_uri(root, STAGING_DIR, f"{load_id}-{uuid.uuid4().hex[:8]}")
    try:
        ds.write_parquet(
            staged,
            filesystem=fs,
            partition_cols=partition_by or None,
            filename_provider=FilenameProvider(dataset_uuid=load_id, file_format="parquet"),
            min_rows_per_file=destination.get("min_rows_per_file", 1_000_000),
        )
        written = describe_files(fs, staged)
        partitions = _leaf_dirs(fs, staged)
        targets = [join_uri(root, p) if p else root for p in partitions]
        if mode == "overwrite":
            _delete_data(fs, root, lambda name: True)
        for target in targets:
            if mode == "overwrite_partitions":
                _delete_data(fs, target, lambda name: True, recursive=False)
            else:  # append: drop only what an earlier try of this same load published
                _delete_data(fs, target, lambda name: name.startswith(f"{load_id}_"), recursive=False)
        for partition, target in zip(partitions, targets, strict=True):
            source = join_uri(staged, partition) if partition else staged
            fs.create_dir(target, recursive=True)
            for info in fs.get_file_info(pafs.FileSelector(source)):
                if info.type == pafs.FileType.File:
                    fs.move(info.path, join_uri(target, info.base_name))
    finally:
        if exists(fs, staged):
            fs.delete_dir(staged)
    return {
        "destination": destination["path"],
        "mode": mode,
        "rows_written": written["num_rows"],
        "files_written": written["num_files"],
        "partitions": sorted(p for p in partitions if p),
    }


def _leaf_dirs(fs: pafs.FileSystem, root: str) -> list[str]:
    """Relative directories under ``root`` that hold files ("" for root itself)."""
    dirs = {
        info.path[len(root) :].strip("/").rpartition("/")[0]
        for info in fs.get_file_info(pafs.FileSelector(root, recursive=True))
        if info.type == pafs.FileType.File
    }
    return sorted(dirs)


def _delete_data(fs: pafs.FileSystem, path: str, match: Callable[[str], bool], recursive: bool = True) -> None:
    """Delete data files under ``path`` (never the ``_staging`` area)."""
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True)):
        relative = info.path[len(path) :].strip("/")
        if info.type == pafs.FileType.File and not relative.startswith(STAGING_DIR) and match(info.base_name):
            fs.delete_file(info.path)


def stage_postgres(ds: ray.data.Dataset, destination: dict, storage: dict | None, load_id: str) -> dict:
    from .postgres import stage_load  # psycopg is an optional extra

    return stage_load(ds, destination, load_id)


def stage_snowflake(ds: ray.data.Dataset, destination: dict, storage: dict | None, load_id: str) -> dict:
    from .snowflake import stage_load  # the Snowflake connector is an optional extra

    return stage_load(ds, destination, load_id)


# BigQuery has no writer here: its load job reads the committed Parquet handoff on gs:// itself
# (see runtime/bigquery.py), so a BigQuery load needs no Ray stage.
WRITERS: dict[str, Callable[..., dict[str, Any]]] = {
    "parquet": write_lake,
    "postgres": stage_postgres,
    "snowflake": stage_snowflake,
}

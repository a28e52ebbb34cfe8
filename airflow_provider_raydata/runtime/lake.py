"""The Parquet lake writer (on the cluster). It replaces exactly what a rerun wrote before.

    {"kind": "parquet", "path": "s3://lake/revenue", "partition_by": ["order_date"],
     "mode": "append" | "overwrite" | "overwrite_partitions" | "upsert", "keys": [...]}

Files are first written to ``{path}/_staging/{load_id}-{token}/`` and moved into place only when
the whole write succeeded. Every file a load publishes is named after its ``load_id`` (one per
DAG run and task; a hex digest), so a retry or rerun of that load first removes its own earlier files: append
never duplicates a run's rows. On object stores the moves are per-file copies, so readers may
briefly see a partition mid-swap; a table format (Iceberg, Delta) is the fix for that.
"""

from __future__ import annotations

import functools
import operator
import uuid
from collections.abc import Callable

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import ray
import ray.data
from ray.data.datasource import FilenameProvider

from ..contracts import DataError, Destination, LoadResult
from .paths import join_uri
from .refs import describe_files
from .storage import exists, filesystem_for
from .upsert import check_no_repeated_key, merge_latest

STAGING_DIR = "_staging"  # {lake}/_staging/{load_id}-{token}/: a load's files before they move into place


def write_lake(ds: ray.data.Dataset, destination: Destination, storage: dict | None, load_id: str) -> LoadResult:
    schema = ds.schema()
    mode, partition_by = destination.mode, list(destination.partition_by)
    if schema is not None:  # an empty result may have no schema to check the columns against
        destination.check_columns(schema.names)
    fs, root = filesystem_for(destination.path, storage)
    staged = join_uri(root, STAGING_DIR, f"{load_id}-{uuid.uuid4().hex[:8]}")
    replaced: list[str] = []  # upsert: the files its merged partitions replace
    merged: dict = {}
    try:
        if mode == "upsert":
            replaced, merged = _merge_upsert(ds, destination, fs, root, staged, load_id)
        else:
            ds.write_parquet(
                staged,
                filesystem=fs,
                partition_cols=partition_by or None,
                filename_provider=FilenameProvider(dataset_uuid=load_id, file_format="parquet"),
                min_rows_per_file=destination.min_rows_per_file or 1_000_000,
            )
        written = describe_files(fs, staged)
        partitions = _leaf_dirs(fs, staged)
        targets = [join_uri(root, p) if p else root for p in partitions]
        if mode == "overwrite":
            _delete_data(fs, root, lambda name: True)
        for target in targets:
            if mode == "overwrite_partitions":
                _delete_data(fs, target, lambda name: True, recursive=False)
            elif mode == "append":  # drop only what an earlier try of this same load published
                _delete_data(fs, target, lambda name: name.startswith(f"{load_id}_"), recursive=False)
        for partition, target in zip(partitions, targets, strict=True):
            source = join_uri(staged, partition) if partition else staged
            fs.create_dir(target, recursive=True)
            for info in fs.get_file_info(pafs.FileSelector(source)):
                if info.type == pafs.FileType.File:
                    fs.move(info.path, join_uri(target, info.base_name))
        # Upsert: the merged files are in place before the replaced ones go, so a kill in between
        # leaves both (a retry merges them into one again), never neither.
        for path in replaced:
            fs.delete_file(path)
    finally:
        if exists(fs, staged):
            fs.delete_dir(staged)
    return LoadResult(
        destination=destination.path,
        mode=mode,
        rows_written=merged.get("rows_written", written["num_rows"]),
        load_id=load_id,
        rows_deleted=merged.get("rows_deleted", 0),
        partitions=sorted(p for p in partitions if p),
        files_written=written["num_files"],
        rows_in_partitions=merged.get("rows_in_partitions"),
    )


def _merge_upsert(ds, destination: Destination, fs, root, staged, load_id) -> tuple[list[str], dict]:
    """Upsert into a Parquet lake (``runtime.upsert``'s rules): rewrite only the partitions this
    load touches. The new rows are gathered in the stage driver: meant for incremental batches,
    and a key must stay in one partition."""
    partition_by = list(destination.partition_by)
    blocks = ray.get(ds.to_arrow_refs())
    new = pa.concat_tables(blocks, promote_options="default") if blocks else None
    if new is None or new.num_rows == 0:
        return [], {"rows_written": 0, "rows_deleted": 0}
    if not destination.upsert.sequence_by:
        check_no_repeated_key(new, destination.upsert)  # before anything exists or changes
    partitioning = pads.partitioning(pa.schema([new.schema.field(c) for c in partition_by]), flavor="hive")
    fs.create_dir(root, recursive=True)  # the first upsert creates the table
    lake = pads.dataset(root, schema=new.schema, format="parquet", filesystem=fs, partitioning=partitioning)
    touched = None
    if partition_by:
        values = new.select(partition_by).group_by(partition_by).aggregate([])
        for row in values.to_pylist():
            match = functools.reduce(operator.and_, [pads.field(c) == row[c] for c in partition_by])
            touched = match if touched is None else touched | match
    fragments = list(lake.get_fragments(filter=touched))
    for fragment in fragments:  # rewriting a file must not drop a column this load lacks
        dropped = [name for name in fragment.physical_schema.names if name not in new.schema.names]
        if dropped:
            raise DataError(f"upsert: {fragment.path} has column {dropped[0]!r}, which this load lacks")
    replaced = [fragment.path for fragment in fragments]
    try:
        existing = lake.to_table(filter=touched)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        problem = f"upsert into {destination.path}: its files do not match the load's schema: {exc}"
        raise DataError(problem) from None
    merged, deleted = merge_latest(existing, new, destination.upsert)
    pads.write_dataset(
        merged,
        staged,
        format="parquet",
        filesystem=fs,
        partitioning=partition_by or None,
        partitioning_flavor="hive" if partition_by else None,
        basename_template=f"{load_id}-{uuid.uuid4().hex[:8]}-{{i}}.parquet",
        existing_data_behavior="overwrite_or_ignore",
    )
    return replaced, {"rows_written": new.num_rows, "rows_deleted": deleted, "rows_in_partitions": merged.num_rows}


def _leaf_dirs(fs: pafs.FileSystem, root: str) -> list[str]:
    """Relative directories under ``root`` that hold files ("" for root itself)."""
    dirs = {
        info.path[len(root) :].strip("/").rpartition("/")[0]
        for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        if info.type == pafs.FileType.File
    }
    return sorted(dirs)


def _delete_data(fs: pafs.FileSystem, path: str, match: Callable[[str], bool], recursive: bool = True) -> None:
    """Delete data files under ``path`` (never the ``_staging`` area)."""
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True)):
        relative = info.path[len(path) :].strip("/")
        if info.type == pafs.FileType.File and not relative.startswith(STAGING_DIR) and match(info.base_name):
            fs.delete_file(info.path)

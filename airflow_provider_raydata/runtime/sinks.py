"""Writers. The Parquet lake writer replaces exactly what a rerun wrote before.

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
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import ray.data
from ray.data.datasource import FilenameProvider

from .refs import describe_files
from .specs import load_columns, validate_destination
from .storage import exists, filesystem_for, join_uri
from .types import repeated_key

STAGING_DIR = "_staging"


def write_destination(
    ds: ray.data.Dataset, destination: dict[str, Any], storage: dict | None, load_id: str, input_uri: str
) -> dict[str, Any]:
    """Write ``ds`` (the committed dataset at ``input_uri``, read as is) to the destination."""
    kind = destination.get("kind", "parquet")
    if kind == "postgres":
        from .postgres import load  # psycopg is an optional extra

        # COPYs straight from the committed files (no Ray Data pipeline in between), published
        # in a transaction the stage's caller commits with ``finish``.
        result, finish = load(input_uri, storage, destination, load_id)
        return {**result, "finish": finish}
    if kind not in WRITERS:
        raise ValueError(f"Unknown destination kind {kind!r}; known kinds: {', '.join(sorted([*WRITERS, 'postgres']))}")
    return WRITERS[kind](ds, destination, storage, load_id)


def write_lake(ds: ray.data.Dataset, destination: dict, storage: dict | None, load_id: str) -> dict:
    schema = ds.schema()
    validate_destination(destination)
    mode, keys = destination.get("mode", "append"), list(destination.get("keys") or [])
    partition_by = list(destination.get("partition_by") or [])
    if schema is not None:  # an empty result may have no schema to check the columns against
        load_columns(destination, schema.names)
    fs, root = filesystem_for(destination["path"], storage)
    staged = join_uri(root, STAGING_DIR, f"{load_id}-{uuid.uuid4().hex[:8]}")
    replaced: list[str] = []  # upsert: the files its merged partitions replace
    result = {"destination": destination["path"], "mode": mode}
    try:
        if mode == "upsert":
            replaced, merged = _merge_upsert(ds, destination, fs, root, staged, load_id, keys, partition_by)
            result.update(merged)
        else:
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
    result.setdefault("rows_written", written["num_rows"])
    result.update(files_written=written["num_files"], partitions=sorted(p for p in partitions if p))
    return result


def _merge_upsert(ds, destination, fs, root, staged, load_id, keys, partition_by) -> tuple[list[str], dict]:
    """Upsert into a Parquet lake: rewrite only the partitions this load touches.

    The latest row per key wins: by ``sequence_by`` when given (an older row never replaces a
    newer one, so loads may arrive in any order), else this load's row. Keys whose latest row
    has ``delete_column`` true are removed. The new rows are gathered in the stage driver:
    meant for incremental batches, and a key must stay in one partition.
    """
    sequence, flag = destination.get("sequence_by"), destination.get("delete_column")
    blocks = ray.get(ds.to_arrow_refs())
    new = pa.concat_tables(blocks, promote_options="default") if blocks else None
    if new is None or new.num_rows == 0:
        return [], {"rows_written": 0, "rows_deleted": 0}
    if not sequence and (repeated := repeated_key(new, keys)):
        raise ValueError(repeated)
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
            raise ValueError(f"upsert: {fragment.path} has column {dropped[0]!r}, which this load lacks")
    replaced = [fragment.path for fragment in fragments]
    try:
        existing = lake.to_table(filter=touched)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        problem = f"upsert into {destination['path']}: its files do not match the load's schema: {exc}"
        raise ValueError(problem) from None
    rows = pa.concat_tables([existing, new.select(existing.column_names)])
    rows = rows.append_column("_order", pa.array(np.arange(rows.num_rows)))  # existing first, then new
    order = [(k, "ascending") for k in keys] + ([(sequence, "ascending")] if sequence else [])
    rows = rows.take(pc.sort_indices(rows, sort_keys=[*order, ("_order", "ascending")]))
    rows = rows.set_column(rows.schema.get_field_index("_order"), "_order", pa.array(np.arange(rows.num_rows)))
    latest = rows.group_by(keys, use_threads=False).aggregate([("_order", "max")])["_order_max"]
    merged = rows.take(latest.take(pc.sort_indices(latest))).drop_columns(["_order"])  # in key order
    deleted = 0
    if flag:
        keep = pc.invert(pc.fill_null(merged[flag], False))
        deleted = merged.num_rows - pc.sum(keep.cast(pa.int64())).as_py()
        merged = merged.filter(keep)
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


def stage_snowflake(ds: ray.data.Dataset, destination: dict, storage: dict | None, load_id: str) -> dict:
    from .snowflake import stage_load  # the Snowflake connector is an optional extra

    return stage_load(ds, destination, load_id)


# BigQuery has no writer here: its load job reads the committed Parquet handoff on gs:// itself
# (see runtime/bigquery.py), so a BigQuery load needs no Ray stage.
WRITERS: dict[str, Callable[..., dict[str, Any]]] = {
    "parquet": write_lake,
    "snowflake": stage_snowflake,
}

"""Dataset references (``contracts.DatasetRef``) and the atomic commit behind them (on the cluster).

A stage writes its Parquet files into a fresh attempt directory under its task prefix,
``{staging_uri}/{dag_id}/{run_id}/{task_id}/attempt-{try}-{token}/``, and commits by writing
``_SUCCESS`` (one small object: atomic on local disks and on S3) last. Readers require the
marker, so a killed or failed attempt is never read. After a commit the task's older attempts
are deleted: a rerun replaces its own output.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..contracts import DatasetRef, ProducedBy
from .paths import join_uri
from .storage import exists, filesystem_for

SUCCESS = "_SUCCESS"
ATTEMPT_PREFIX = "attempt-"  # no "=": readers would take it for a hive partition
QUARANTINE_DIR = "quarantine"  # a quality task's failing rows: {task prefix}/quarantine/attempt-*/


def new_attempt_uri(prefix: str, try_number: int) -> str:
    return join_uri(prefix, f"{ATTEMPT_PREFIX}{try_number}-{uuid.uuid4().hex[:8]}")


def data_files(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    """The Parquet files of a dataset directory, in path order."""
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    files = [f for f in fs.get_file_info(selector) if f.type == pafs.FileType.File and f.path.endswith(".parquet")]
    return sorted(files, key=lambda f: f.path)


def describe_files(fs: pafs.FileSystem, path: str) -> dict[str, Any]:
    """Row count, schema, size and file count of a Parquet directory, from the file footers."""
    files = data_files(fs, path)
    num_rows, schema = 0, None
    for f in files:
        with fs.open_input_file(f.path) as handle:
            meta = pq.ParquetFile(handle).metadata
            num_rows += meta.num_rows
            schema = schema or meta.schema.to_arrow_schema()
    return {
        "num_rows": num_rows,
        "schema": {field.name: str(field.type) for field in schema} if schema else {},
        "size_bytes": sum(f.size for f in files),
        "num_files": len(files),
    }


def arrow_schema(ref: DatasetRef, storage: dict | None) -> pa.Schema:
    """A committed dataset's Arrow schema, from its first file's footer (every dataset has one:
    an empty result is written as one empty file)."""
    fs, path = filesystem_for(ref.uri, storage)
    files = data_files(fs, path)
    if not files:
        return pa.schema([])
    with fs.open_input_file(files[0].path) as handle:
        return pq.read_schema(handle)


def commit(attempt_uri: str, storage: dict | None, produced_by: ProducedBy) -> DatasetRef:
    """Write the ``_SUCCESS`` marker for an attempt, drop older attempts, return the reference."""
    fs, path = filesystem_for(attempt_uri, storage)
    fs.create_dir(path, recursive=True)  # an empty result still commits as an empty dataset
    ref = DatasetRef(uri=attempt_uri, **describe_files(fs, path), produced_by=produced_by)
    with fs.open_output_stream(f"{path}/{SUCCESS}") as out:
        out.write(json.dumps(ref.to_dict()).encode())
    parent = path.rsplit("/", 1)[0]
    for info in fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True)):
        name = info.base_name
        if name.startswith(ATTEMPT_PREFIX) and info.path != path and info.type == pafs.FileType.Directory:
            fs.delete_dir(info.path)
    return ref


def resolve(ref: DatasetRef, storage: dict | None) -> DatasetRef:
    """Check a reference's commit marker; return the reference the marker records."""
    uri = ref.uri
    fs, path = filesystem_for(uri, storage)
    marker = f"{path}/{SUCCESS}"
    if not exists(fs, marker):
        if not exists(fs, path):
            raise FileNotFoundError(f"Input dataset not found: {uri}")
        raise FileNotFoundError(f"Input dataset {uri} is not committed (no {SUCCESS} marker)")
    with fs.open_input_stream(marker) as handle:
        return DatasetRef.from_dict(json.loads(handle.read()))

"""A stage's output: written to a fresh attempt directory of its task's staging prefix and
committed (``refs.commit``); on the cluster."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pyarrow as pa
import ray.data

from ..contracts import DataError, DatasetRef, StageSpec
from . import refs
from .storage import exists, filesystem_for

log = logging.getLogger("airflow_provider_raydata.stage")


def write_empty_if_needed(fs, path: str, schema: pa.Schema) -> None:
    """An empty result still carries its schema: one empty Parquet file."""
    import pyarrow.parquet as pq

    if not refs.data_files(fs, path):
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(f"{path}/empty.parquet") as out:
            pq.write_table(schema.empty_table(), out)


def write_output(
    ds: ray.data.Dataset,
    spec: StageSpec,
    min_rows_per_file: int,
    schema: pa.Schema | Callable[[], pa.Schema | None] | None = None,
) -> DatasetRef:
    """Write to a fresh attempt directory and commit it; never leave a half-written attempt.
    ``schema``: the schema of an empty result, or a function that tells it (called only then);
    otherwise it is asked from ``ds``, which may run part of it."""
    attempt = refs.new_attempt_uri(spec.output_uri, spec.produced_by.try_number)
    fs, path = filesystem_for(attempt, spec.storage)
    try:
        ds.write_parquet(path, filesystem=fs, min_rows_per_file=min_rows_per_file)
        if not refs.data_files(fs, path):
            if callable(schema):
                try:
                    schema = schema()
                except DataError as exc:  # e.g. a function that cannot take an empty batch
                    log.warning("No rows, and their columns are not known from the steps (%s); asking Ray Data", exc)
                    schema = None
            if schema is None:
                found = ds.schema()
                schema = found.base_schema if found is not None else pa.schema([])
            write_empty_if_needed(fs, path, schema)
        return refs.commit(attempt, spec.storage, spec.produced_by)
    except BaseException:
        if exists(fs, path):
            fs.delete_dir(path)
        raise

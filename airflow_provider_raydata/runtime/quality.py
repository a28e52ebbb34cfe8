"""The quality stage (on the cluster): measure every check in one pass, then write the failing
rows to the quarantine and the passing rows to the output, both committed references."""

from __future__ import annotations

import ray.data

from ..contracts import DatasetRef, QualityReport, StageSpec
from . import refs
from .checks import quarantine_schema, run_checks, split_batch
from .output import write_empty_if_needed, write_output
from .paths import join_uri
from .storage import exists, filesystem_for


def run_quality(
    ds: ray.data.Dataset, source: DatasetRef, spec: StageSpec, min_rows_per_file: int
) -> tuple[QualityReport, DatasetRef, DatasetRef]:
    """The report, the passing rows' reference and the quarantine's. Without quarantined rows the
    passing reference is the input itself; otherwise a second pass splits the rows. Rows in
    always equal rows passed + rows quarantined (verified on the committed files)."""
    storage = spec.storage
    report, checks, keys = run_checks(ds, list(spec.checks), storage, spec.score_threshold)
    schema = refs.arrow_schema(source, storage)
    quarantine = refs.new_attempt_uri(join_uri(spec.output_uri, refs.QUARANTINE_DIR), spec.produced_by.try_number)
    fs, path = filesystem_for(quarantine, storage)
    try:
        ref = source
        if report.rows_quarantined:
            passing = ds.map_batches(
                split_batch,
                batch_format="pyarrow",
                batch_size=None,
                zero_copy_batch=True,
                fn_kwargs={"checks": checks, "quarantine_uri": quarantine, "storage": storage, "keys": keys},
            )
            ref = write_output(passing, spec, min_rows_per_file, schema=schema)
        write_empty_if_needed(fs, path, quarantine_schema(schema))
        quarantine_ref = refs.commit(quarantine, storage, spec.produced_by)
    except BaseException:
        if exists(fs, path):
            fs.delete_dir(path)
        raise
    if (ref.num_rows, quarantine_ref.num_rows) != (report.rows_passed, report.rows_quarantined):
        raise RuntimeError(
            f"quality split does not add up: {report.rows_in} rows in, {ref.num_rows} written as passing "
            f"and {quarantine_ref.num_rows} as quarantined (expected {report.rows_passed} and "
            f"{report.rows_quarantined}); is a custom check function non-deterministic?"
        )
    return report, ref, quarantine_ref

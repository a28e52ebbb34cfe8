"""BigQuery loads (on the Airflow worker): load jobs straight from the committed Parquet files."""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from dataclasses import replace
from typing import Any

from ...contracts import BigQueryPlan, DataError, DatasetRef, Destination, LoadResult, UpsertRule
from ..upsert import merge_statement, repeated_key_query
from .common import STAGING_PREFIX, quote, quoted_table, table_parts

_PARTITION = {4: "YEAR", 6: "MONTH", 8: "DAY", 10: "HOUR"}


def bq_type(arrow: str) -> str:
    """A BigQuery column type for an Arrow type (as a reference's schema spells it)."""
    text = arrow.strip().lower()
    if text.startswith("dictionary<values="):
        return bq_type(text[len("dictionary<values=") :].split(",")[0])
    if text.startswith("timestamp"):
        return "TIMESTAMP" if "tz=" in text else "DATETIME"
    if match := re.fullmatch(r"decimal(?:128|256)?\((\d+),\s*(\d+)\)", text):
        precision, scale = int(match[1]), int(match[2])
        return "NUMERIC" if scale <= 9 and precision - scale <= 29 else "BIGNUMERIC"
    for prefixes, name in (
        (("bool",), "BOOL"),
        (("int", "uint8", "uint16", "uint32"), "INT64"),
        (("float", "double", "halffloat"), "FLOAT64"),
        (("string", "large_string", "utf8", "large_utf8", "string_view"), "STRING"),
        (("binary", "large_binary"), "BYTES"),
        (("date",), "DATE"),
        (("time",), "TIME"),
    ):
        if text.startswith(prefixes):
            return name
    raise DataError(f"Arrow type {arrow} has no BigQuery mapping; cast it first")


def load_plan(ref: DatasetRef, destination: Destination, load_id: str, default_project: str | None) -> BigQueryPlan:
    """Everything ``publish`` will send, decided up front (no request made here)."""
    mode, rule = destination.mode, destination.upsert
    if not ref.uri.startswith("gs://"):
        raise DataError(f"A BigQuery load reads the Parquet handoff from GCS: stage on gs:// (got {ref.uri})")
    project, dataset, table = table_parts(destination.table, destination.project or default_project)
    schema = [{"name": name, "type": bq_type(t), "mode": "NULLABLE"} for name, t in ref.schema.items()]
    columns = list(ref.schema)
    if columns:
        destination.check_columns(columns)
    config: dict[str, Any] = {
        "sourceFormat": "PARQUET",
        "createDisposition": "CREATE_IF_NEEDED",
        "writeDisposition": "WRITE_APPEND" if mode == "append" else "WRITE_TRUNCATE",
        "parquetOptions": {"enableListInference": True},
        "decimalTargetTypes": ["NUMERIC", "BIGNUMERIC"],
    }
    if schema:
        config["schema"] = {"fields": schema}
    target = {"projectId": project, "datasetId": dataset, "tableId": table}
    extra: dict[str, Any] = {}
    if mode == "replace_partition":
        partition = str(destination.partition).replace("-", "")
        if not (partition.isdigit() and len(partition) in _PARTITION):
            raise DataError(f"partition {destination.partition!r}: use YYYY, YYYYMM, YYYYMMDD or YYYYMMDDHH")
        target["tableId"] = f"{table}${partition}"
        config["timePartitioning"] = {"type": _PARTITION[len(partition)], "field": destination.partition_by[0]}
        extra["partitions"] = [partition]
    if mode == "upsert":
        if not columns:
            raise DataError("an upsert needs the reference's schema (pass the upstream task's output)")
        staging = f"{STAGING_PREFIX}{load_id}"  # the same name on a retry: WRITE_TRUNCATE replaces it
        target = {"projectId": project, "datasetId": dataset, "tableId": staging}
        extra["staging_table"] = f"{project}.{dataset}.{staging}"
        extra["merge_script"] = merge_script((project, dataset, table), (project, dataset, staging), columns, rule)
    if mode == "append":  # the job id is the ledger: one successful append per (run, task, table)
        digest = hashlib.sha1(f"{load_id}\n{project}.{dataset}.{table}".encode()).hexdigest()[:16]
        extra["job_id_prefix"] = f"raydata_append_{digest}"
    config["destinationTable"] = target
    return BigQueryPlan(
        destination=f"{project}.{dataset}.{table}",
        project=project,
        mode=mode,
        load_id=load_id,
        source_uris=[ref.uri.rstrip("/") + "/*.parquet"],
        load_config={"load": config},
        location=destination.location,
        **extra,
    )


REPEATED_KEY_ERROR = "upsert: a key appears more than once in this load; set sequence_by to keep the latest"


def merge_script(
    target: tuple[str, str, str], staging: tuple[str, str, str], columns: list[str], rule: UpsertRule
) -> str:
    """Create the target if needed, then ``runtime.upsert``'s rules: a load that repeats a key
    without ``sequence_by`` fails the script (``ERROR()``), else one MERGE of the latest rows."""
    source = quoted_table(*staging)
    statements = []
    if not rule.sequence_by:  # before anything is created or changed
        repeated = repeated_key_query(quote, source, rule)
        statements.append(f"SELECT IF(EXISTS({repeated}), ERROR('{REPEATED_KEY_ERROR}'), 0)")
    statements.append(f"CREATE TABLE IF NOT EXISTS {quoted_table(*target)} LIKE {source}")
    statements.append(merge_statement(quote, quoted_table(*target), source, columns, rule))
    return ";\n".join(statements) + ";"


def publish(client, plan: BigQueryPlan) -> LoadResult:
    """Run the plan's jobs with a ``google.cloud.bigquery.Client``; wait for each to finish."""
    from google.cloud import bigquery

    started = time.perf_counter()
    result = LoadResult(plan.destination, plan.mode, 0, plan.load_id, partitions=plan.partitions)
    job_config = bigquery.LoadJobConfig.from_api_repr(plan.load_config)
    destination = bigquery.TableReference.from_api_repr(plan.load_config["load"]["destinationTable"])
    job_id = f"raydata_{plan.mode}_{plan.load_id}_{uuid.uuid4().hex[:8]}"
    if plan.mode == "append":
        job_id, done = _append_job_id(client, plan)
        if done is not None:  # this run's append was already published: never twice
            return replace(result, skipped=True, seconds=round(time.perf_counter() - started, 3))
    load = client.load_table_from_uri(
        plan.source_uris, destination, job_id=job_id, job_config=job_config, location=plan.location
    )
    load.result()
    rows = int(load.output_rows or 0)
    if plan.mode == "upsert":
        try:
            merge = client.query(plan.merge_script, job_id=f"{job_id}_merge", location=plan.location, job_retry=None)
            merge.result()
        finally:
            client.delete_table(plan.staging_table, not_found_ok=True)
    return replace(result, rows_written=rows, seconds=round(time.perf_counter() - started, 3))


def _append_job_id(client, plan: BigQueryPlan, attempts: int = 20):
    """The first free job id of this append, or the job that already appended (id, job)."""
    from google.api_core.exceptions import NotFound

    for n in range(attempts):
        job_id = f"{plan.job_id_prefix}_{n}"
        try:
            job = client.get_job(job_id, location=plan.location)
        except NotFound:
            return job_id, None
        if job.state != "DONE":
            job.result()  # an earlier try's job still running: its outcome decides
        if job.error_result is None:
            return job_id, job
    raise RuntimeError(f"{attempts} failed append jobs for {plan.destination}: see job {job_id}")

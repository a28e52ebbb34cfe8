"""BigQuery: query results read in parallel streams, loads straight from the Parquet handoff.

Read (on the cluster): the query runs once as a query job with typed query parameters (never
formatted into the SQL); its result table is read through the BigQuery Storage Read API, one
Ray read task per stream. Ray's own ``read_bigquery`` uses the cluster's default credentials
and takes no query parameters, hence this small reader with the caller's access token.

Load (no Ray stage: BigQuery reads the committed Parquet files from gs:// itself):
- ``append``: a ``WRITE_APPEND`` load job whose job id is derived from the load id, so a retry
  of the same run finds the job that already appended and does not append twice;
- ``overwrite``: one ``WRITE_TRUNCATE`` load job (atomic);
- ``replace_partition``: a ``WRITE_TRUNCATE`` load job into ``table$YYYYMMDD`` (BigQuery rejects
  rows outside that partition);
- ``upsert``: a load job into a staging table, one ``MERGE`` script, then the staging table is
  dropped.
Identifiers are validated and quoted with backticks.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from typing import Any

import pyarrow as pa
from ray.data.datasource import Datasource, ReadTask

BQ_MODES = ("append", "overwrite", "replace_partition", "upsert")
STAGING_PREFIX = "_raydata_"
_PROJECT = re.compile(r"(?:[a-z0-9.-]+:)?[a-z][a-z0-9-]{4,28}[a-z0-9]")
_DATASET = re.compile(r"\w{1,1024}", re.ASCII)
_TABLE = re.compile(r"[\w\- ]{1,1024}")  # letters, marks, numbers, connectors, dashes, spaces
_PARTITION = {4: "YEAR", 6: "MONTH", 8: "DAY", 10: "HOUR"}


def table_parts(name: str | dict, default_project: str | None = None) -> tuple[str, str, str]:
    """``"project.dataset.table"``, ``"dataset.table"`` or a dict -> validated (project, dataset, table)."""
    if isinstance(name, dict):
        parts = [name.get("project") or default_project, name.get("dataset"), name.get("table")]
    else:
        parts = name.split(".") if isinstance(name, str) else []
        parts = [default_project, *parts] if len(parts) == 2 else parts
    if len(parts) != 3:
        raise ValueError(f"Invalid BigQuery table {name!r}: use 'project.dataset.table' or 'dataset.table'")
    project, dataset, table = parts
    for part, pattern, what in (
        (project, _PROJECT, "project"),
        (dataset, _DATASET, "dataset"),
        (table, _TABLE, "table"),
    ):
        if not isinstance(part, str) or not pattern.fullmatch(part):
            raise ValueError(f"Invalid BigQuery {what} name {part!r} in table {name!r}")
    return project, dataset, table


def quote(name: str) -> str:
    """A backtick-quoted BigQuery identifier (backslashes and backticks escaped)."""
    if not isinstance(name, str) or not name or "\n" in name:
        raise ValueError(f"Invalid BigQuery identifier {name!r}")
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def quoted_table(project: str, dataset: str, table: str) -> str:
    return ".".join(quote(p) for p in (project, dataset, table))


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
    raise ValueError(f"Arrow type {arrow} has no BigQuery mapping; cast it first")


# --- loading ------------------------------------------------------------------------------


def load_plan(ref: dict[str, Any] | str, destination: dict[str, Any], load_id: str, default_project: str | None):
    """Everything ``publish`` will send, decided up front (plain data; no request made here)."""
    mode = destination.get("mode", "append")
    if mode not in BQ_MODES:
        raise ValueError(f"Unknown mode {mode!r} for a BigQuery destination; use {', '.join(BQ_MODES)}")
    uri = ref["uri"] if isinstance(ref, dict) else ref
    if not uri.startswith("gs://"):
        raise ValueError(f"A BigQuery load reads the Parquet handoff from GCS: stage on gs:// (got {uri})")
    project, dataset, table = table_parts(destination["table"], destination.get("project") or default_project)
    arrow_schema = (ref.get("schema") if isinstance(ref, dict) else None) or {}
    schema = [{"name": name, "type": bq_type(t), "mode": "NULLABLE"} for name, t in arrow_schema.items()]
    columns = list(arrow_schema)
    keys, partition_by = list(destination.get("keys") or []), list(destination.get("partition_by") or [])
    for column in [*keys, *partition_by, *[c for c in (destination.get("sequence_by"),) if c]]:
        if columns and column not in columns:
            raise ValueError(f"Unknown column {column!r} for {mode}; dataset columns: {', '.join(columns)}")
    plan: dict[str, Any] = {
        "kind": "bigquery",
        "destination": f"{project}.{dataset}.{table}",
        "project": project,
        "location": destination.get("location"),
        "mode": mode,
        "load_id": load_id,
        "source_uris": [uri.rstrip("/") + "/*.parquet"],
        "schema": schema,
        "rows_in": ref.get("num_rows") if isinstance(ref, dict) else None,
    }
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
    if mode == "replace_partition":
        partition = str(destination["partition"]).replace("-", "")
        if not (partition.isdigit() and len(partition) in _PARTITION):
            raise ValueError(f"partition {destination['partition']!r}: use YYYY, YYYYMM, YYYYMMDD or YYYYMMDDHH")
        target["tableId"] = f"{table}${partition}"
        config["timePartitioning"] = {"type": _PARTITION[len(partition)], "field": partition_by[0]}
        plan["partitions"] = [partition]
    if mode == "upsert":
        if not keys:
            raise ValueError("mode 'upsert' needs keys")
        if not columns:
            raise ValueError("an upsert needs the reference's schema (pass the upstream task's output)")
        staging = f"{STAGING_PREFIX}{load_id}"  # the same name on a retry: WRITE_TRUNCATE replaces it
        target = {"projectId": project, "datasetId": dataset, "tableId": staging}
        plan["staging_table"] = f"{project}.{dataset}.{staging}"
        plan["merge_sql"] = merge_sql((project, dataset, table), (project, dataset, staging), columns, destination)
    config["destinationTable"] = target
    plan["load_config"] = {"load": config}
    if mode == "append":  # the job id is the ledger: one successful append per (run, task, table)
        digest = hashlib.sha1(f"{load_id}\n{plan['destination']}".encode()).hexdigest()[:16]
        plan["job_id_prefix"] = f"raydata_append_{digest}"
    return plan


def merge_sql(target: tuple[str, str, str], staging: tuple[str, str, str], columns: list[str], destination) -> str:
    """Create the target if needed, then MERGE the latest staged row per key into it."""
    keys, sequence_by, flag = destination["keys"], destination.get("sequence_by"), destination.get("delete_column")
    names = ", ".join(map(quote, columns))
    rows = f"SELECT {names} FROM {quoted_table(*staging)}"
    if sequence_by:
        partition = ", ".join(map(quote, keys))
        rows += (
            f" WHERE TRUE QUALIFY ROW_NUMBER() OVER (PARTITION BY {partition} ORDER BY {quote(sequence_by)} DESC) = 1"
        )
    match = " AND ".join(f"t.{quote(k)} = s.{quote(k)}" for k in keys)
    clauses = [f"WHEN MATCHED AND s.{quote(flag)} THEN DELETE"] if flag else []
    updates = ", ".join(f"{quote(c)} = s.{quote(c)}" for c in columns if c not in keys)
    if updates:
        clauses.append(f"WHEN MATCHED THEN UPDATE SET {updates}")
    condition = f" AND s.{quote(flag)} IS NOT TRUE" if flag else ""
    clauses.append(
        f"WHEN NOT MATCHED{condition} THEN INSERT ({names}) VALUES ({', '.join(f's.{quote(c)}' for c in columns)})"
    )
    return (
        f"CREATE TABLE IF NOT EXISTS {quoted_table(*target)} LIKE {quoted_table(*staging)};\n"
        f"MERGE {quoted_table(*target)} AS t USING ({rows}) AS s ON {match}\n" + "\n".join(clauses) + ";"
    )


def publish(client, plan: dict[str, Any]) -> dict[str, Any]:
    """Run the plan's jobs with a ``google.cloud.bigquery.Client``; wait for each to finish."""
    from google.cloud import bigquery

    started = time.perf_counter()
    result = {key: plan[key] for key in ("destination", "mode", "load_id")}
    result.update(rows_written=0, rows_deleted=0, skipped=False, partitions=plan.get("partitions", []))
    job_config = bigquery.LoadJobConfig.from_api_repr(plan["load_config"])
    destination = bigquery.TableReference.from_api_repr(plan["load_config"]["load"]["destinationTable"])
    job_id = f"raydata_{plan['mode']}_{plan['load_id']}_{uuid.uuid4().hex[:8]}"
    if plan["mode"] == "append":
        job_id, done = _append_job_id(client, plan)
        if done is not None:  # this run's append was already published: never twice
            return {**result, "skipped": True, "seconds": round(time.perf_counter() - started, 3)}
    load = client.load_table_from_uri(
        plan["source_uris"], destination, job_id=job_id, job_config=job_config, location=plan.get("location")
    )
    load.result()
    result["rows_written"] = int(load.output_rows or 0)
    if plan["mode"] == "upsert":
        try:
            merge = client.query(
                plan["merge_sql"], job_id=f"{job_id}_merge", location=plan.get("location"), job_retry=None
            )
            merge.result()
        finally:
            client.delete_table(plan["staging_table"], not_found_ok=True)
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


def _append_job_id(client, plan: dict[str, Any], attempts: int = 20):
    """The first free job id of this append, or the job that already appended (id, job)."""
    from google.api_core.exceptions import NotFound

    for n in range(attempts):
        job_id = f"{plan['job_id_prefix']}_{n}"
        try:
            job = client.get_job(job_id, location=plan.get("location"))
        except NotFound:
            return job_id, None
        if job.state != "DONE":
            job.result()  # an earlier try's job still running: its outcome decides
        if job.error_result is None:
            return job_id, job
    raise RuntimeError(f"{attempts} failed append jobs for {plan['destination']}: see job {job_id}")


# --- reading ------------------------------------------------------------------------------


def query_parameters(parameters: dict[str, Any] | list | None) -> list:
    """Typed BigQuery query parameters (``@name`` for a dict, ``?`` for a list)."""
    import datetime as dt
    from decimal import Decimal

    from google.cloud import bigquery

    def typed(name: str | None, value: Any):
        if isinstance(value, (list, tuple)):
            kinds = {typed(None, v).type_ for v in value} or {"STRING"}
            return bigquery.ArrayQueryParameter(name, kinds.pop(), list(value))
        for kind, name_ in (
            (bool, "BOOL"),
            (int, "INT64"),
            (float, "FLOAT64"),
            (Decimal, "NUMERIC"),
            (dt.datetime, "TIMESTAMP"),
            (dt.date, "DATE"),
            (bytes, "BYTES"),
        ):
            if isinstance(value, kind):
                return bigquery.ScalarQueryParameter(name, name_, value)
        return bigquery.ScalarQueryParameter(name, "STRING", None if value is None else str(value))

    if isinstance(parameters, dict):
        return [typed(name, value) for name, value in parameters.items()]
    return [typed(None, value) for value in parameters or []]


def run_query(client, source: dict[str, Any], default_project: str | None) -> str:
    """The table to read: the source's table, or the result table of its query job."""
    from google.cloud import bigquery

    if bool(source.get("query")) == bool(source.get("table")):
        raise ValueError("A BigQuery source needs exactly one of 'query' or 'table'")
    if source.get("table"):
        return ".".join(table_parts(source["table"], default_project))
    config = bigquery.QueryJobConfig(query_parameters=query_parameters(source.get("parameters")))
    job = client.query(source["query"], job_config=config, location=source.get("location"))
    job.result()
    return f"{job.destination.project}.{job.destination.dataset_id}.{job.destination.table_id}"


def clients(conn: dict[str, Any]):
    from google.cloud import bigquery
    from google.oauth2.credentials import Credentials

    return bigquery.Client(project=conn["project"], credentials=Credentials(conn["token"]))


def read_bigquery(source: dict[str, Any], storage: dict | None):
    import ray
    import ray.data
    from google.cloud import bigquery_storage

    conn = source["conn"]
    project, dataset, table = run_query(clients(conn), source, conn.get("project")).split(".")
    streams = int(source.get("num_streams") or max(2, ray.cluster_resources().get("CPU", 2)))
    session = _read_client(conn["token"]).create_read_session(
        parent=f"projects/{conn['project']}",
        read_session=bigquery_storage.types.ReadSession(
            table=f"projects/{project}/datasets/{dataset}/tables/{table}",
            data_format=bigquery_storage.types.DataFormat.ARROW,
        ),
        max_stream_count=streams,
    )
    schema = pa.ipc.read_schema(pa.py_buffer(session.arrow_schema.serialized_schema))
    empty = ray.data.from_arrow(schema.empty_table())  # keeps the schema when no row matches
    if not session.streams:
        return empty
    names = [s.name for s in session.streams]
    return empty.union(ray.data.read_datasource(_Streams(names, conn["token"], schema)))


def _read_client(token: str):
    from google.cloud import bigquery_storage
    from google.oauth2.credentials import Credentials

    return bigquery_storage.BigQueryReadClient(credentials=Credentials(token))


def _read_stream(name: str, token: str, schema: pa.Schema) -> pa.Table:
    table = _read_client(token).read_rows(name).to_arrow()
    return table.cast(schema) if table.num_columns else schema.empty_table()


class _Streams(Datasource):
    """One read task per Storage Read API stream (each opens its own read client)."""

    def __init__(self, names: list[str], token: str, schema: pa.Schema):
        self._names, self._token, self._schema = names, token, schema

    def __repr__(self) -> str:  # never show the token
        return f"BigQueryStreams({len(self._names)})"

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        from ray.data.block import BlockMetadata

        token, schema = self._token, self._schema
        return [
            ReadTask(
                lambda name=name: [_read_stream(name, token, schema)],
                BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None),
                per_task_row_limit=per_task_row_limit,
            )
            for name in self._names
        ]

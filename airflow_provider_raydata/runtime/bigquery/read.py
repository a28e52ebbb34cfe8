"""Read a BigQuery table or query result (on the cluster) through the Storage Read API."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pyarrow as pa
from ray.data.datasource import Datasource, ReadTask

from ...contracts import Source
from .common import _read_client, clients, table_parts

if TYPE_CHECKING:
    import ray.data


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


def run_query(client, source: Source, default_project: str | None) -> str:
    """The table to read: the source's table, or the result table of its query job."""
    from google.cloud import bigquery

    if source.table:
        return ".".join(table_parts(source.table, default_project))
    config = bigquery.QueryJobConfig(query_parameters=query_parameters(source.parameters))
    job = client.query(source.query, job_config=config, location=source.location)
    job.result()
    return f"{job.destination.project}.{job.destination.dataset_id}.{job.destination.table_id}"


def read_bigquery(source: Source, storage: dict | None) -> tuple[ray.data.Dataset, pa.Schema]:
    """The table's (or the query result's) rows, and their schema from the read session."""
    import ray
    import ray.data
    from google.cloud import bigquery_storage

    conn = source.conn
    project, dataset, table = run_query(clients(conn), source, conn.get("project")).split(".")
    streams = int(source.num_streams or max(2, ray.cluster_resources().get("CPU", 2)))
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
        return empty, schema
    names = [s.name for s in session.streams]
    return empty.union(ray.data.read_datasource(_Streams(names, conn["token"], schema))), schema


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

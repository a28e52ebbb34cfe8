"""Destinations, identifiers, type mapping and storage connections, without services."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from airflow_provider_raydata.contracts import Source
from airflow_provider_raydata.hooks.connections import resolve_connection
from airflow_provider_raydata.hooks.postgres import postgres_params
from airflow_provider_raydata.hooks.storage import aws_storage_options
from airflow_provider_raydata.operators import RayDataLoadOperator
from airflow_provider_raydata.runtime.postgres.common import pg_type, table_parts
from airflow_provider_raydata.runtime.postgres.read import source_query
from airflow_provider_raydata.runtime.storage import filesystem_for

REF = {"uri": "/tmp/x", "num_rows": 1}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"destination": "/tmp/lake", "mode": "replace_partition"}, "Unknown mode 'replace_partition' for a parquet"),
        ({"destination": "/tmp/lake", "mode": "overwrite_partitions"}, "needs partition_by"),
        ({"destination": {"kind": "postgres", "table": "t"}, "mode": "merge"}, "use append, overwrite, replace_"),
        ({"destination": {"kind": "postgres", "table": "t"}, "mode": "upsert"}, "'upsert' needs keys"),
        ({"destination": {"kind": "postgres", "table": "t"}, "mode": "replace_partition"}, "needs partition_by"),
        ({"destination": {"kind": "postgres"}}, "needs 'table'"),
        ({"destination": {"kind": "oracle"}}, "Unknown destination kind 'oracle'"),
    ],
)
def test_bad_destinations_fail_at_parse_time(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RayDataLoadOperator(task_id="load", input=REF, **kwargs)


def test_table_names_become_quoted_identifiers():
    from psycopg import sql

    assert table_parts("orders") == ("public", "orders")
    assert table_parts("sales.orders") == ("sales", "orders")
    assert table_parts({"schema": "a.b", "table": "c"}) == ("a.b", "c")
    hostile = 'x"; DROP TABLE victim; --'
    schema, table = table_parts(f"public.{hostile}")
    assert sql.Identifier(schema, table).as_string() == '"public"."x""; DROP TABLE victim; --"'
    query, params = source_query(Source.from_user({"kind": "postgres", "table": "s.t"}))
    assert query == 'SELECT * FROM "s"."t"' and params is None
    with pytest.raises(ValueError, match="exactly one of 'query' or 'table'"):
        Source.from_user({"kind": "postgres", "table": "t", "query": "SELECT 1"})


@pytest.mark.parametrize(
    ("arrow", "postgres"),
    [
        (pa.int32(), "integer"),
        (pa.int64(), "bigint"),
        (pa.float64(), "double precision"),
        (pa.decimal128(15, 2), "numeric(15, 2)"),
        (pa.large_string(), "text"),
        (pa.bool_(), "boolean"),
        (pa.date32(), "date"),
        (pa.timestamp("us", tz="UTC"), "timestamp with time zone"),
        (pa.timestamp("ns"), "timestamp without time zone"),
        (pa.dictionary(pa.int32(), pa.string()), "text"),
    ],
)
def test_arrow_types_map_to_postgres(arrow, postgres):
    assert pg_type(pa.field("c", arrow)) == postgres


def test_unmappable_type_names_the_column():
    with pytest.raises(ValueError, match="Column 'tags': Arrow type list<item: string>"):
        pg_type(pa.field("tags", pa.list_(pa.string())))


def test_postgres_connection_becomes_libpq_params(monkeypatch):
    conn = {
        "conn_type": "postgres",
        "host": "db.internal",
        "port": 5433,
        "login": "etl",
        "password": "pw-123",
        "schema": "warehouse",
        "extra": {"sslmode": "require", "cursor": "dictcursor"},
    }
    monkeypatch.setenv("AIRFLOW_CONN_WH", json.dumps(conn))
    assert postgres_params("wh") == {
        "host": "db.internal",
        "port": 5433,
        "dbname": "warehouse",
        "user": "etl",
        "password": "pw-123",
        "sslmode": "require",
    }
    source = resolve_connection(Source.from_user({"kind": "postgres", "postgres_conn_id": "wh", "table": "t"}))
    assert source.conn_id == "wh" and source.conn["host"] == "db.internal"
    assert "pw-123" not in repr(source)


def test_aws_connection_gives_s3_options_for_s3_compatible_stores(monkeypatch):
    conn = {
        "conn_type": "aws",
        "login": "AKIAEXAMPLE",
        "password": "secret-key",
        "extra": {"endpoint_url": "http://minio.internal:9000", "region_name": "eu-west-1"},
    }
    monkeypatch.setenv("AIRFLOW_CONN_MINIO", json.dumps(conn))
    options = aws_storage_options("minio")
    assert options == {
        "aws_access_key_id": "AKIAEXAMPLE",
        "aws_secret_access_key": "secret-key",
        "region_name": "eu-west-1",
        "endpoint_url": "http://minio.internal:9000",
    }
    fs, path = filesystem_for("s3://bucket/key", options)
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/key"
    assert fs.region == "eu-west-1"


def test_gcs_options_build_a_token_filesystem():
    """gs:// is only checked this far (no GCS emulator runs here): the filesystem pyarrow gets."""
    options = {"gcs_access_token": "ya29.token", "gcs_token_expiry": "2030-01-01T00:00:00+00:00", "gcs_project": "p"}
    fs, path = filesystem_for("gs://bucket/dir/", options)
    assert isinstance(fs, pafs.GcsFileSystem) and path == "bucket/dir"
    assert fs.project_id == "p"


def test_copy_shares_balance_files_and_split_a_single_file_by_row_groups(tmp_path):
    """Parallel COPY tasks get about equal shares: whole files, or row groups of one big file."""
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from airflow_provider_raydata.runtime.postgres.staging import _shares
    from airflow_provider_raydata.runtime.refs import data_files

    fs = pafs.LocalFileSystem()
    for index, rows in enumerate([4000, 1000, 1000, 1000, 1000]):
        pq.write_table(pa.table({"id": pa.array(range(rows), pa.int64())}), tmp_path / f"part-{index}.parquet")
    shares = _shares(fs, data_files(fs, str(tmp_path)), 2)
    assert sorted(len(share) for share in shares) == [1, 4]  # the big file alone, the four small together
    assert all(groups is None for share in shares for _, groups in share)

    one = tmp_path / "one"
    one.mkdir()
    pq.write_table(pa.table({"id": pa.array(range(4000), pa.int64())}), one / "part-0.parquet", row_group_size=1000)
    shares = _shares(fs, data_files(fs, str(one)), 2)
    assert sorted(sorted(g for _, [g] in share) for share in shares) == [[0, 2], [1, 3]]

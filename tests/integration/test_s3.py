"""Sources, staging and the lake on S3, through moto's S3 server on loopback."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from airflow_provider_raydata.operators import RayDataExtractOperator, RayDataLoadOperator, RayDataTransformOperator
from tests.helpers import run_operator

pytestmark = pytest.mark.integration


def test_extract_transform_load_on_s3(monkeypatch, ray_head, s3_server):
    options = s3_server["options"]
    conn = ray_head.connection(staging_uri="s3://lake/staging", storage_options=options)
    monkeypatch.setenv("AIRFLOW_CONN_RAYDATA_DEFAULT", json.dumps(conn))
    client = s3_server["client"]
    table = pa.table({"id": list(range(300)), "day": ["2024-01-01", "2024-01-02", "2024-01-03"] * 100})
    for day in ("2024-01-01", "2024-01-02"):
        buffer = io.BytesIO()
        pacsv.write_csv(table.filter(pa.compute.equal(table["day"], day)), buffer)
        client.put_object(Bucket="lake", Key=f"raw/{day}/events.csv", Body=buffer.getvalue())

    ref, ti = run_operator(RayDataExtractOperator(task_id="extract", source="s3://lake/raw/*/events.csv"))
    assert ref["num_rows"] == 200 and ref["uri"].startswith("s3://lake/staging/tests/")
    assert options["aws_secret_access_key"] not in json.dumps([ref, ti.xcoms])

    shaped, _ = run_operator(
        RayDataTransformOperator(task_id="shape", input=ref, steps=[{"op": "filter", "expr": "id % 2 == 0"}])
    )
    result, _ = run_operator(
        RayDataLoadOperator(
            task_id="load",
            input=shaped,
            destination="s3://lake/out",
            partition_by=["day"],
            mode="overwrite_partitions",
        )
    )
    assert result["rows_written"] == 100
    s3 = pafs.S3FileSystem(
        endpoint_override=options["endpoint_url"].split("://")[1],
        scheme="http",
        access_key=options["aws_access_key_id"],
        secret_key=options["aws_secret_access_key"],
    )
    loaded = pq.read_table("lake/out", filesystem=s3).to_pandas()
    assert len(loaded) == 100 and (loaded["id"] % 2 == 0).all()
    assert sorted(loaded["day"].astype(str).unique()) == ["2024-01-01", "2024-01-02"]
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="lake", Prefix="out/")["Contents"]]
    assert not any("_staging" in k and k.endswith(".parquet") for k in keys)  # staged files were moved


def test_errors_about_s3_inputs_name_the_full_uri(monkeypatch, ray_head, s3_server):
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    conn = ray_head.connection(staging_uri="s3://lake/staging", storage_options=s3_server["options"])
    monkeypatch.setenv("AIRFLOW_CONN_RAYDATA_DEFAULT", json.dumps(conn))
    client = s3_server["client"]
    client.put_object(Bucket="lake", Key="bad/2024-01-01/ragged.csv", Body=b"id,price\n1,2.5\n2,3.5,oops\n")
    client.put_object(Bucket="lake", Key="bad/2024-01-01/broken.parquet", Body=b"PAR1 not really parquet")
    cases = [
        ("s3://lake/bad/2024-01-09/*.csv", AirflowException, "Source path not found: s3://lake/bad/2024-01-09"),
        (
            "s3://lake/bad/2024-01-01/ragged.csv",
            AirflowFailException,
            "Cannot parse s3://lake/bad/2024-01-01/ragged.csv: ",
        ),
        (
            "s3://lake/bad/2024-01-01/broken.parquet",
            AirflowFailException,
            "Corrupt or truncated Parquet file s3://lake/bad/2024-01-01/broken.parquet: ",
        ),
    ]
    for source, kind, message in cases:
        with pytest.raises(kind) as failed:
            run_operator(RayDataExtractOperator(task_id="extract", source=source))
        assert message in str(failed.value), str(failed.value)

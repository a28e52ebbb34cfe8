"""Staging retention on S3 (moto's server): object ages are the server's, so the clock moves."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from airflow_provider_raydata.runtime import retention


def clean_staging(*args, **kwargs) -> dict:
    """The summary as XCom shows it."""
    return retention.clean_staging(*args, **kwargs).to_dict()


pytestmark = pytest.mark.integration


def test_clean_staging_on_s3(s3_server):
    client, options = s3_server["client"], s3_server["options"]
    prefix = f"retention-{uuid.uuid4().hex[:6]}"

    def put(key: str, body: bytes = b"x") -> None:
        client.put_object(Bucket="lake", Key=f"{prefix}/{key}", Body=body)

    produced_by = {"dag_id": "d", "run_id": "manual__1", "task_id": "t", "try_number": 1}
    put("staging/d/manual__1/t/attempt-1-aaaa/part-0.parquet")
    put("staging/d/manual__1/t/attempt-1-aaaa/_SUCCESS", json.dumps({"produced_by": produced_by}).encode())
    put("staging/d/manual__2/t/attempt-1-bbbb/part-0.parquet")
    put(
        "staging/d/manual__2/t/attempt-1-bbbb/_SUCCESS",
        json.dumps({"produced_by": {**produced_by, "run_id": "manual__2"}}).encode(),
    )
    put("staging/d/manual__2/t/attempt-2-cccc/part-0.parquet")  # killed
    put("staging-other/d/manual__3/t/attempt-1-dddd/part-0.parquet")  # outside the root
    put("lake/orders/day=1/x_0.parquet")
    put("lake/orders/_staging/x-eeee/day=1/x_0.parquet")

    later = datetime.now(UTC) + timedelta(days=10)
    summary = clean_staging(
        f"s3://lake/{prefix}/staging",
        options,
        7,
        active_runs=[["d", "manual__2"]],
        now=later,
        lake_paths=[f"s3://lake/{prefix}/lake/orders"],
    )

    assert summary["counts"] == {"run": 1, "attempt": 1, "lake_staging": 1} and summary["errors"] == []
    assert {e["path"] for e in summary["removed"]} == {
        f"s3://lake/{prefix}/staging/d/manual__1",
        f"s3://lake/{prefix}/staging/d/manual__2/t/attempt-2-cccc",
        f"s3://lake/{prefix}/lake/orders/_staging/x-eeee",
    }
    listed = client.list_objects_v2(Bucket="lake", Prefix=f"{prefix}/")
    files = sorted(o["Key"][len(prefix) + 1 :] for o in listed.get("Contents", []) if not o["Key"].endswith("/"))
    assert files == [
        "lake/orders/day=1/x_0.parquet",
        "staging-other/d/manual__3/t/attempt-1-dddd/part-0.parquet",
        "staging/d/manual__2/t/attempt-1-bbbb/_SUCCESS",
        "staging/d/manual__2/t/attempt-1-bbbb/part-0.parquet",
    ]

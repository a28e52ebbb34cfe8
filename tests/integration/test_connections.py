"""Connecting: token auth, version mismatch, and two clusters one after the other in one process."""

from __future__ import annotations

import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from airflow.sdk.exceptions import AirflowException

from airflow_provider_raydata.operators import RayDataExtractOperator
from tests.conftest import running_head
from tests.helpers import run_operator

pytestmark = pytest.mark.integration
TOKEN = "planted-token-7c1b5d0e2f3a4b6c8d9e0f1a2b3c4d5e"


@pytest.fixture(scope="module")
def token_head():
    yield from running_head({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN})


@pytest.fixture
def source(tmp_path):
    pq.write_table(pa.table({"id": list(range(10))}), tmp_path / "data.parquet")
    return str(tmp_path / "data.parquet")


def extract_on(conn_id: str, source: str, staging: str):
    op = RayDataExtractOperator(task_id="extract", source=source, raydata_conn_id=conn_id, staging_uri=staging)
    return run_operator(op)


def test_token_auth_and_two_clusters_in_one_process(monkeypatch, ray_head, token_head, source, tmp_path):
    def connection(head, password=None):
        conn = head.connection()
        if password:
            conn["password"] = password
        return json.dumps(conn)

    monkeypatch.setenv("AIRFLOW_CONN_RAY_A", connection(ray_head))
    monkeypatch.setenv("AIRFLOW_CONN_RAY_TOKEN", connection(token_head, TOKEN))
    monkeypatch.setenv("AIRFLOW_CONN_RAY_NO_TOKEN", connection(token_head))
    monkeypatch.setenv("AIRFLOW_CONN_RAY_BAD_TOKEN", connection(token_head, "not-the-token"))
    staging = str(tmp_path / "staging")

    first, _ = extract_on("ray_a", source, staging)
    second, _ = extract_on("ray_token", source, staging)
    third, _ = extract_on("ray_a", source, staging)
    assert first["num_rows"] == second["num_rows"] == third["num_rows"] == 10

    for conn_id, problem in [("ray_no_token", "is required"), ("ray_bad_token", "was rejected")]:
        started = time.monotonic()
        with pytest.raises(AirflowException) as error:
            extract_on(conn_id, source, staging)
        assert time.monotonic() - started < 10
        message = str(error.value)
        assert f"Ray cluster at {token_head.address} uses token authentication" in message
        assert problem in message and TOKEN not in message


def test_version_mismatch_is_named(monkeypatch, ray_head, source, tmp_path):
    """Stand-in for an older client: this process reports another Ray version to the real server."""
    import ray

    from airflow_provider_raydata.hooks.ray import drop_client_session

    drop_client_session()  # a new Ray Client session, as in a fresh task process
    monkeypatch.setenv("AIRFLOW_CONN_RAYDATA_DEFAULT", json.dumps(ray_head.connection()))
    monkeypatch.setattr(ray, "__version__", "2.59.0")
    with pytest.raises(AirflowException, match=f"Ray version mismatch with the cluster at {ray_head.address}"):
        extract_on("raydata_default", source, str(tmp_path))

import time

import pytest
from airflow.sdk.exceptions import AirflowException

from airflow_provider_raydata.contracts import ProducedBy, StageSpec
from airflow_provider_raydata.hooks.ray import ClusterSettings, RayHook, settings_from_connection
from airflow_provider_raydata.operators import RayDataExtractOperator
from tests.services import free_port


def test_connection_fields_become_settings():
    settings = settings_from_connection(
        "ray-head.internal",
        None,
        "s3cr3t-token",
        {"namespace": "etl", "runtime_env": '{"pip": ["x"]}', "staging_uri": "s3://b/stage", "connect_timeout": "5"},
    )
    assert settings.address == "ray://ray-head.internal:10001"
    assert settings.runtime_env == {"pip": ["x"]} and settings.namespace == "etl"
    assert settings.connect_timeout == 5.0
    assert "s3cr3t-token" not in repr(settings)
    assert settings_from_connection("ray://h:20001", None, None, {}).address == "ray://h:20001"
    assert settings_from_connection(None, None, None, {}).embedded


def test_bad_runtime_env_json_is_named():
    with pytest.raises(AirflowException, match="'runtime_env' is not valid JSON"):
        settings_from_connection("h", 1, None, {"runtime_env": "{pip:"})


def test_unreachable_cluster_fails_fast_naming_the_address():
    port = free_port()  # nothing listens there
    hook = RayHook(raydata_conn_id=None, connect_timeout=5)
    hook.__dict__["settings"] = ClusterSettings(address=f"ray://127.0.0.1:{port}", auth_token="tok-123456")
    started = time.monotonic()
    with pytest.raises(AirflowException) as error:
        hook.run_stage(StageSpec(stage="extract", name="t", produced_by=ProducedBy()))
    assert time.monotonic() - started < 5
    assert f"Ray cluster at ray://127.0.0.1:{port} is unreachable" in str(error.value)
    assert "tok-123456" not in str(error.value)


def test_remote_cluster_needs_a_shared_staging_uri(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_RAYDATA_REMOTE", '{"conn_type": "raydata", "host": "ray-head", "port": 10001}')
    op = RayDataExtractOperator(task_id="e", source="/data", raydata_conn_id="raydata_remote")
    with pytest.raises(AirflowException, match="needs a shared staging URI such as s3://"):
        op.resolve_staging_uri()
    assert (
        RayDataExtractOperator(task_id="e", source="/d", raydata_conn_id=None)
        .resolve_staging_uri()
        .endswith("raydata/staging")
    )

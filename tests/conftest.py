"""Test services: a real Ray head (reached over ray://), moto's S3 server, an Airflow home.

With RAYDATA_REQUIRE_SERVICES=1 (CI) a service that cannot start fails the tests that need
it instead of skipping them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REQUIRE_SERVICES = os.environ.get("RAYDATA_REQUIRE_SERVICES") == "1"

# Before Airflow is imported anywhere: a private Airflow home with its own SQLite database.
_AIRFLOW_HOME = tempfile.mkdtemp(prefix="raydata-airflow-")
os.environ.update(
    AIRFLOW_HOME=_AIRFLOW_HOME,
    AIRFLOW__CORE__LOAD_EXAMPLES="False",
    AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "dags"),
    AIRFLOW__CORE__UNIT_TEST_MODE="False",
    # Explicit: otherwise a local ray.init() turns token auth on for later clusters.
    RAY_AUTH_MODE="disabled",
    RAY_USAGE_STATS_ENABLED="0",
)
sys.path.insert(0, str(ROOT / "scripts"))

from tests.services import BIN, PostgresServer, RayHead, ServiceUnavailable, free_port, wait_for_port  # noqa: E402


def unavailable(reason: str):
    if REQUIRE_SERVICES:
        pytest.fail(f"required service unavailable: {reason}")
    pytest.skip(reason)


def running_head(env: dict[str, str] | None = None):
    """A started Ray head for a fixture to yield; stopped and removed afterwards."""
    head = RayHead(Path(tempfile.mkdtemp(prefix="rayh-")), env=env)  # short: socket paths are length-limited
    try:
        head.start()
    except ServiceUnavailable as exc:
        unavailable(str(exc))
    yield head
    from airflow_provider_raydata.hooks.ray import drop_client_session

    drop_client_session()  # operators keep their Ray Client session open between stages
    head.stop()
    shutil.rmtree(head.temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_head():
    yield from running_head()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on loopback, with a bucket ``lake``."""
    if shutil.which("moto_server", path=str(BIN)) is None:
        unavailable("moto_server is not installed")
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if not wait_for_port(port, 30):
        proc.kill()
        unavailable("moto_server did not start")
    import boto3

    options = {
        "endpoint_url": f"http://127.0.0.1:{port}",
        "region_name": "us-east-1",
        "aws_access_key_id": "testing",
        "aws_secret_access_key": "testing-secret",
    }
    client = boto3.client("s3", **options)
    client.create_bucket(Bucket="lake")
    yield {"options": options, "client": client}
    proc.kill()


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server started for the session (password auth on loopback)."""
    server = PostgresServer(Path(tempfile.mkdtemp(prefix="raydata-pg-")) / "data")
    try:
        server.start()
    except ServiceUnavailable as exc:
        unavailable(str(exc))
    yield server
    server.stop()
    shutil.rmtree(server.data_dir.parent, ignore_errors=True)


@contextlib.contextmanager
def new_database(postgres_server):
    """A fresh database on the session's server: its connection JSON and an open connection."""
    import json
    import uuid
    from types import SimpleNamespace

    import psycopg

    name = f"t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(**postgres_server.params, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    params = {**postgres_server.params, "dbname": name}
    airflow_conn = json.dumps({**postgres_server.connection(), "schema": name})
    with psycopg.connect(**params, autocommit=True) as conn:
        yield SimpleNamespace(conn=conn, params=params, conn_id="pg_test", dbname=name, airflow_conn=airflow_conn)


@pytest.fixture
def pg(postgres_server, monkeypatch):
    """A fresh database for one test, reachable as the Airflow connection ``pg_test``."""
    with new_database(postgres_server) as db:
        monkeypatch.setenv("AIRFLOW_CONN_PG_TEST", db.airflow_conn)
        yield db


@pytest.fixture(scope="session")
def airflow_db():
    result = subprocess.run([str(BIN / "airflow"), "db", "migrate"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return Path(_AIRFLOW_HOME)


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory):
    import sample_data as generator

    root = tmp_path_factory.mktemp("source")
    generator.generate(str(root), "2024-01-01", "2024-01-03", orders_per_day=1500)
    return root


@pytest.fixture
def ray_conn(ray_head, monkeypatch):
    """``raydata_default`` points at the test head."""
    import json

    monkeypatch.setenv("AIRFLOW_CONN_RAYDATA_DEFAULT", json.dumps(ray_head.connection()))
    return ray_head


SERVICE_TOKEN = "raydata-service-token-for-tests"


@pytest.fixture(scope="session")
def stage_service(ray_head):
    """The stage service's URL on the test head (started by the first task that uses it)."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
def service_conn(ray_head, stage_service, monkeypatch):
    """``raydata_default`` names the stage service (the HTTP transport) of the test head."""
    import json

    conn = {
        "conn_type": "raydata",
        "host": stage_service,
        "password": SERVICE_TOKEN,
        "extra": {"dashboard_url": ray_head.dashboard_url},
    }
    monkeypatch.setenv("AIRFLOW_CONN_RAYDATA_DEFAULT", json.dumps(conn))
    return conn


@pytest.fixture(scope="module")
def service_for_module(ray_head, stage_service):
    """``service_conn`` for a whole module."""
    import json

    conn = {
        "conn_type": "raydata",
        "host": stage_service,
        "password": SERVICE_TOKEN,
        "extra": {"dashboard_url": ray_head.dashboard_url},
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AIRFLOW_CONN_RAYDATA_DEFAULT", json.dumps(conn))
        yield conn


@pytest.fixture(scope="session")
def fakesnow_server():
    """fakesnow's server on loopback: the real Snowflake connector talks HTTP to a DuckDB stand-in."""
    fakesnow = pytest.importorskip("fakesnow")
    with fakesnow.server() as params:
        yield params


@pytest.fixture
def sf(fakesnow_server, monkeypatch):
    """A fresh database for one test, reachable as the Airflow connection ``sf_test``."""
    import json
    import uuid
    from types import SimpleNamespace

    import snowflake.connector

    database = f"DB_{uuid.uuid4().hex[:8].upper()}"
    conn = snowflake.connector.connect(**fakesnow_server, paramstyle="qmark")
    conn.cursor().execute(f"CREATE DATABASE {database}")
    conn.cursor().execute(f"CREATE SCHEMA {database}.PUBLIC")
    conn.cursor().execute(f"USE SCHEMA {database}.PUBLIC")
    extra = {
        "account": "fakesnow",
        "database": database,
        "host": fakesnow_server["host"],
        "port": fakesnow_server["port"],
        "protocol": "http",
        "network_timeout": 10,  # fakesnow answers an unsupported statement with HTTP 500: no endless retry
        "session_parameters": {"CLIENT_OUT_OF_BAND_TELEMETRY_ENABLED": False},
    }
    connection = {"conn_type": "snowflake", "login": "fake", "password": "snow-secret", "schema": "PUBLIC"}
    monkeypatch.setenv("AIRFLOW_CONN_SF_TEST", json.dumps({**connection, "extra": extra}))
    yield SimpleNamespace(conn=conn, conn_id="sf_test", database=database)
    conn.close()

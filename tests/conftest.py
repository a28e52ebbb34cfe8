"""Test services: a real Ray head (reached over ray://), moto's S3 server, an Airflow home.

With RAYDATA_REQUIRE_SERVICES=1 (CI) a service that cannot start fails the tests that need
it instead of skipping them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
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


def unavailable(reason: str):
    if REQUIRE_SERVICES:
        pytest.fail(f"required service unavailable: {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.2)
    return False


class RayHead:
    """``ray start --head`` on free ports; stopped by killing the processes of its temp dir."""

    def __init__(self, temp_dir: Path, env: dict[str, str] | None = None):
        self.temp_dir = temp_dir
        self.client_port = free_port()
        self.dashboard_port = free_port()
        self.env = {**os.environ, **(env or {})}
        self.address = f"ray://127.0.0.1:{self.client_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"

    def start(self) -> None:
        cmd = [
            str(BIN / "ray"),
            "start",
            "--head",
            f"--port={free_port()}",
            f"--ray-client-server-port={self.client_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--dashboard-agent-listen-port={free_port()}",
            "--num-cpus=2",
            "--include-dashboard=true",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
        ]
        result = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120)
        if result.returncode != 0 or not wait_for_port(self.client_port, 60):
            self.stop()
            unavailable(f"ray start --head failed: {result.stdout[-2000:]}{result.stderr[-2000:]}")

    def stop(self) -> None:
        import psutil

        marker = str(self.temp_dir)
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if any(marker in part for part in proc.info["cmdline"] or []):
                    proc.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        time.sleep(1)

    def connection(self, **extra) -> dict:
        """An Airflow connection (JSON form) to this head."""
        return {
            "conn_type": "raydata",
            "host": "127.0.0.1",
            "port": self.client_port,
            "extra": {"dashboard_url": self.dashboard_url, **extra},
        }


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    head = RayHead(Path(tempfile.mkdtemp(prefix="rayh-")))  # short: Ray's socket paths are length-limited
    head.start()
    yield head
    head.stop()
    shutil.rmtree(head.temp_dir, ignore_errors=True)


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

"""Faults during stages, against a real Ray head over ray:// (issue 5, items 4 and 5): a killed
Ray worker, a killed stage process, an unreachable head, a dropped Ray Client connection, bad
Parquet input, a retry after the remote stage already committed, and on_kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from airflow_provider_raydata.contracts import ProducedBy
from airflow_provider_raydata.hooks.ray import drop_client_session
from airflow_provider_raydata.operators import RayDataExtractOperator, RayDataTransformOperator
from airflow_provider_raydata.runtime import refs
from tests.conftest import ROOT
from tests.helpers import run_operator
from tests.services import TcpProxy
from tests.slow_functions import slow_double

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def committed_ids(root: Path, files: int, rows_per_file: int) -> dict:
    attempt = refs.new_attempt_uri(str(root), 1)
    os.makedirs(attempt)
    for n in range(files):
        ids = pa.array(range(n * rows_per_file, (n + 1) * rows_per_file), pa.int64())
        pq.write_table(pa.table({"id": ids}), f"{attempt}/part-{n:03d}.parquet")
    return refs.commit(attempt, None, ProducedBy()).to_dict()


def processes(title: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(title in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def wait_for_processes(title: str, timeout: float = 90) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := processes(title):
            return found
        time.sleep(0.1)
    raise AssertionError(f"no process titled {title!r} within {timeout}s")


def committed_attempts(staging: Path, task_id: str) -> list[Path]:
    return sorted(staging.glob(f"**/{task_id}/attempt-*/_SUCCESS"))


def slow_transform(task_id: str, ref: dict, staging: Path, **kwargs) -> RayDataTransformOperator:
    return RayDataTransformOperator(
        task_id=task_id, input=ref, fn=slow_double, batch_size=None, staging_uri=str(staging), **kwargs
    )


def in_thread(call):
    """Run ``call`` in a thread; return (thread, outcome dict with 'result' or 'error' and 'seconds')."""
    outcome: dict = {}

    def target():
        started = time.monotonic()
        try:
            outcome["result"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc
        outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def test_killed_ray_worker_during_transform_is_retried_and_the_stage_succeeds(ray_conn, tmp_path):
    ref = committed_ids(tmp_path / "in", files=12, rows_per_file=1000)
    op = slow_transform("worker_kill", ref, tmp_path / "staging")
    thread, outcome = in_thread(lambda: run_operator(op)[0])
    victim = wait_for_processes("MapBatches(slow_double)")[0]
    victim.kill()  # SIGKILL a Ray worker in the middle of a map task
    thread.join(240)
    assert "error" not in outcome, outcome.get("error")
    out = outcome["result"]
    table = pq.read_table(out["uri"])
    assert out["num_rows"] == 12_000 == table.num_rows
    assert sorted(table["id"].to_pylist()) == list(range(12_000))  # every row once: none lost, none twice
    assert table["doubled"].to_pylist() == [i * 2 for i in table["id"].to_pylist()]


def test_killed_stage_process_fails_clearly_commits_nothing_and_the_retry_completes(ray_conn, tmp_path):
    ref = committed_ids(tmp_path / "in", files=8, rows_per_file=1000)
    staging = tmp_path / "staging"
    op = slow_transform("driver_kill", ref, staging)
    thread, outcome = in_thread(lambda: run_operator(op)[0])
    wait_for_processes("ray::tests.driver_kill")[0].kill()  # the stage's own driver process
    thread.join(120)
    error = outcome.get("error")
    assert isinstance(error, AirflowException) and not isinstance(error, AirflowFailException)
    assert "Stage failed on ray://" in str(error) and "died" in str(error).lower(), str(error)
    assert committed_attempts(staging, "driver_kill") == []
    out, _ = run_operator(slow_transform("driver_kill", ref, staging), try_number=2)  # Airflow's retry
    assert out["num_rows"] == 8000
    assert [p.parent.name.split("-")[1] for p in committed_attempts(staging, "driver_kill")] == ["2"]


def test_unreachable_head_fails_fast_and_the_next_try_completes(ray_head, tmp_path, monkeypatch):
    proxy = TcpProxy(ray_head.client_port)  # the cluster's address, not listening yet
    conn = {**ray_head.connection(), "port": proxy.port}
    monkeypatch.setenv("AIRFLOW_CONN_RAY_PROXY", json.dumps(conn))
    ref = committed_ids(tmp_path / "in", files=2, rows_per_file=100)
    op = RayDataExtractOperator(
        task_id="unreachable", source=ref["uri"], raydata_conn_id="ray_proxy", staging_uri=str(tmp_path / "stg")
    )
    started = time.monotonic()
    with pytest.raises(AirflowException) as failure:
        run_operator(op)
    assert time.monotonic() - started < 10
    # Retryable (not AirflowFailException): Airflow's retries apply; the message names the address.
    assert not isinstance(failure.value, AirflowFailException)
    assert f"Ray cluster at ray://127.0.0.1:{proxy.port} is unreachable" in str(failure.value)
    proxy.start()
    try:
        out, _ = run_operator(op, try_number=2)
        assert out["num_rows"] == 200
    finally:
        drop_client_session()  # before the proxy goes: later tests start from a clean session
        proxy.stop()


def test_dropped_client_connection_fails_in_bounded_time_and_the_retry_completes(ray_head, tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_RAYDATA_DEFAULT", json.dumps(ray_head.connection()))
    monkeypatch.setenv("RAY_CLIENT_RECONNECT_GRACE_PERIOD", "5")  # the Ray Client's own wait before giving up
    drop_client_session()  # a new session, which reads the grace period
    ref = committed_ids(tmp_path / "in", files=16, rows_per_file=500)
    staging = tmp_path / "staging"
    op = slow_transform("dropped", ref, staging, fn_kwargs={"seconds": 2})
    thread, outcome = in_thread(lambda: run_operator(op)[0])
    wait_for_processes("ray::tests.dropped")  # the stage is running (for 16 s or more)
    # The session's end on the head goes away (as when the network or the head's client server
    # fails); a TCP proxy cannot cut it reliably: the Ray Client reconnects through it.
    servers = [p for p in processes(f":{ray_head.gcs_port}") if "specific-server" in " ".join(p.cmdline())]
    assert servers, "no Ray Client server process for this session"
    dropped_at = time.monotonic()
    for server in servers:
        server.kill()
    thread.join(120)
    assert not thread.is_alive(), "the task hung after its Ray Client connection dropped"
    failed_after = time.monotonic() - dropped_at
    error = outcome.get("error")
    assert isinstance(error, AirflowException), outcome
    assert failed_after < 60, failed_after
    out, _ = run_operator(slow_transform("dropped", ref, staging), try_number=2)  # Airflow's retry
    assert out["num_rows"] == 8000
    time.sleep(3)  # the first try's stage was superseded: it never commits after the retry
    assert [p.parent.name.split("-")[1] for p in committed_attempts(staging, "dropped")] == ["2"]
    assert processes("ray::tests.dropped") == []


def test_bad_parquet_input_is_named_and_nothing_is_committed(ray_conn, tmp_path):
    good = pa.table({"id": pa.array([1, 2, 3], pa.int64()), "amount": pa.array([1.5, 2.5, 3.5])})
    truncated, drifted = tmp_path / "truncated", tmp_path / "drifted"
    for folder in (truncated, drifted):
        folder.mkdir()
        pq.write_table(good, folder / "a.parquet")
    data = (truncated / "a.parquet").read_bytes()
    (truncated / "b.parquet").write_bytes(data[: len(data) // 2])  # a file cut off mid-write
    pq.write_table(good.set_column(1, "amount", pa.array(["1.5", "x", "3.5"])), drifted / "b.parquet")
    staging = tmp_path / "staging"
    expectations = {
        truncated: f"Corrupt or truncated Parquet file {truncated}/b.parquet",
        drifted: f"Schema drift: column 'amount' is string in {drifted}/b.parquet but double in {drifted}/a.parquet",
    }
    for source, message in expectations.items():
        op = RayDataExtractOperator(task_id=f"bad_{source.name}", source=str(source), staging_uri=str(staging))
        with pytest.raises(AirflowException, match="Stage failed") as failure:
            run_operator(op)
        assert message in str(failure.value)
    assert list(staging.glob("**/_SUCCESS")) == []
    assert list(staging.glob("**/*.parquet")) == []  # not even an uncommitted part


def test_retry_after_the_remote_stage_committed_leaves_one_output(ray_conn, tmp_path):
    """The worker died right after its stage committed (no XCom pushed): the retry replaces it."""
    ref = committed_ids(tmp_path / "in", files=2, rows_per_file=100)
    staging = tmp_path / "staging"
    op = RayDataExtractOperator(task_id="committed", source=ref["uri"], staging_uri=str(staging))
    first, _ = run_operator(op, try_number=1)  # its result never reached Airflow
    second, ti = run_operator(op, try_number=2)
    assert second["num_rows"] == 200 and second["uri"] != first["uri"]
    assert [p.parent for p in committed_attempts(staging, "committed")] == [Path(second["uri"])]
    assert not Path(first["uri"]).exists()


ON_KILL_SCRIPT = """
import json, signal, sys
from airflow_provider_raydata.operators import RayDataTransformOperator
from tests.helpers import run_operator
from tests.slow_functions import slow_double
op = RayDataTransformOperator(task_id="killed", input=json.loads(sys.argv[1]), fn=slow_double, batch_size=None,
                              staging_uri=sys.argv[2])
signal.signal(signal.SIGTERM, lambda *_: op.on_kill())  # what Airflow's task runner installs
run_operator(op)
"""


def test_on_kill_cancels_the_ray_task_and_nothing_is_committed(ray_conn, tmp_path):
    ref = committed_ids(tmp_path / "in", files=16, rows_per_file=500)
    staging = tmp_path / "staging"
    task = subprocess.Popen(
        [sys.executable, "-c", ON_KILL_SCRIPT, json.dumps(ref), str(staging)], cwd=ROOT, env=dict(os.environ)
    )
    try:
        # A new process opens a new Ray Client session. Ray's client server now and then fails to
        # start one (ray-project/ray#63202); RayHook retries, and a failed try costs ~40 s.
        stage = wait_for_processes("ray::tests.killed", timeout=180)[0]
        wait_for_processes("MapBatches(slow_double)")
        task.send_signal(signal.SIGTERM)  # Airflow: the task was marked failed or cleared
        stage.wait(timeout=20)  # ray.cancel(force=True) ended the stage's process
        assert task.wait(timeout=60) != 0
    finally:
        task.kill()
    deadline = time.monotonic() + 30
    while processes("MapBatches(slow_double)") and time.monotonic() < deadline:
        time.sleep(0.2)  # its Ray Data tasks go with their owner
    assert processes("MapBatches(slow_double)") == []
    assert committed_attempts(staging, "killed") == []

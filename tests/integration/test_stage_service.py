"""The stage service's HTTP transport against a real Ray head: the service job started through
the Jobs API, its API, and the operators over ``http://`` (real PostgreSQL for a held load)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

import httpx
import pyarrow.parquet as pq
import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from airflow_provider_raydata.contracts import ProducedBy, StageSpec
from airflow_provider_raydata.hooks.ray import RayHook
from airflow_provider_raydata.hooks.stage_service import JobsApi
from airflow_provider_raydata.operators import RayDataLoadOperator, RayDataTransformOperator
from airflow_provider_raydata.wire import encode_spec
from tests.conftest import ROOT, SERVICE_TOKEN
from tests.helpers import run_operator
from tests.integration.test_faults import (
    committed_attempts,
    committed_ids,
    in_thread,
    processes,
    slow_transform,
    wait_for_processes,
)
from tests.services import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PIPELINE_SCRIPT = """
import json, sys
from airflow_provider_raydata.operators import RayDataQualityOperator, RayDataTransformOperator
from tests.helpers import run_operator
from tests.slow_functions import noisy_double

ref, staging = json.loads(sys.argv[1]), sys.argv[2]
clean = RayDataTransformOperator(task_id="clean", input=ref, fn=noisy_double,
                                 steps=[{"op": "filter", "expr": "id >= 10"}], staging_uri=staging)
out, _ = run_operator(clean)
checked = RayDataQualityOperator(task_id="quality", input=out, staging_uri=staging,
                                 checks=[{"check": "not_null", "column": "doubled"}])
final, _ = run_operator(checked)
print("RESULT " + json.dumps({"rows": final["num_rows"], "ray_imported": "ray" in sys.modules}))
"""


def api(url: str, token: str | None = SERVICE_TOKEN) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"} if token else {}, timeout=60)


def test_a_task_process_on_the_service_imports_no_ray_and_logs_stage_lines_at_their_levels(service_conn, tmp_path):
    ref = committed_ids(tmp_path / "in", files=4, rows_per_file=50)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", PIPELINE_SCRIPT, json.dumps(ref), str(tmp_path / "staging")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    result = json.loads(output.split("RESULT ", 1)[1].splitlines()[0])
    assert result == {"rows": 190, "ray_imported": False}
    # The stage's own lines reach the task log while it runs, at their own level (Ray Data's
    # informational lines used to show as ERROR lines read from stderr), each line once.
    started = [line for line in output.splitlines() if "[stage] Starting execution of Dataset" in line]
    assert len(started) == 2 and all("[info" in line for line in started), started
    assert not [line for line in output.splitlines() if "[stage]" in line and "[error" in line]
    assert "quality stage tests.quality@manual__2024-01-02T00:00:00+00:00 finished" in output
    # The user function's prints, made in Ray Data's map tasks (other processes), too.
    printed = [line for line in output.splitlines() if "[stage] noisy_double:" in line]
    assert printed and all("[info" in line for line in printed), printed
    assert sum(int(re.search(r"noisy_double: (\d+) rows", line)[1]) for line in printed) == 200


def test_the_api_answers_bad_requests_with_a_4xx_naming_the_problem_and_keeps_serving(service_conn):
    RayHook().service()  # started (or found) through the Jobs API
    url = service_conn["host"]
    spec = StageSpec(stage="extract", name="tests.bad", produced_by=ProducedBy(), stage_id="bad-1")
    with api(url, token=None) as anonymous, api(url, token="not-the-token") as wrong, api(url) as client:
        assert anonymous.get("/v1/health").status_code == 401
        answer = wrong.post("/v1/stages", json={"spec": encode_spec(spec)})
        assert answer.status_code == 401 and answer.json() == {"error": "missing or wrong bearer token"}
        bad_json = client.post("/v1/stages", content=b"{not json", headers={"Content-Type": "application/json"})
        assert bad_json.status_code == 400 and "not JSON" in bad_json.json()["error"]
        no_spec = client.post("/v1/stages", json={"stage": "extract"})
        assert no_spec.status_code == 400 and '"spec"' in no_spec.json()["error"]
        typo = client.post("/v1/stages", json={"spec": {**encode_spec(spec), "stagee": "x"}})
        assert typo.status_code == 400 and "stagee" in typo.json()["error"]
        bad_id = client.post("/v1/stages", json={"spec": {**encode_spec(spec), "stage_id": "../etc"}})
        assert bad_id.status_code == 400 and "stage_id" in bad_id.json()["error"]
        bad_lease = client.post("/v1/stages", json={"spec": encode_spec(spec), "lease_seconds": -1})
        assert bad_lease.status_code == 400 and "lease_seconds" in bad_lease.json()["error"]
        assert client.get("/v1/stages/never-submitted").status_code == 404
        assert "no route" in client.get("/v1/nothing-here").json()["error"]
        huge = client.post(
            "/v1/stages", content=b"x" * (33 * 1024 * 1024), headers={"Content-Type": "application/json"}
        )
        assert huge.status_code == 413 and "limit" in huge.json()["error"]
        health = client.get("/v1/health").json()  # still serving
    from airflow_provider_raydata import __version__

    assert health["version"] == __version__ and health["ray_version"] == "2.60.0"


def test_a_wrong_token_fails_naming_the_url_and_never_the_token(
    ray_head, stage_service, service_conn, monkeypatch, tmp_path
):
    RayHook().service()
    conn = {**service_conn, "password": "a-wrong-secret-token"}
    monkeypatch.setenv("AIRFLOW_CONN_RAYDATA_WRONG", json.dumps(conn))
    ref = committed_ids(tmp_path / "in", files=1, rows_per_file=10)
    op = RayDataTransformOperator(
        task_id="wrong_token",
        input=ref,
        steps=[{"op": "select", "columns": ["id"]}],
        raydata_conn_id="raydata_wrong",
        staging_uri=str(tmp_path / "stg"),
    )
    with pytest.raises(AirflowException) as failure:
        run_operator(op)
    assert f"The stage service at {stage_service} rejected the token" in str(failure.value)
    assert "a-wrong-secret-token" not in str(failure.value)


def test_a_repeated_submit_is_the_same_stage_and_a_cancel_stops_it_with_nothing_committed(service_conn, tmp_path):
    hook = RayHook()
    service = hook.service()
    ref = committed_ids(tmp_path / "in", files=16, rows_per_file=100)
    staging = tmp_path / "staging"
    op = slow_transform("cancelled", ref, staging)
    from tests.helpers import FakeTaskInstance

    ti = FakeTaskInstance(task_id="cancelled")
    fields = op.stage_fields({"ti": ti})
    fields["output_uri"] = str(staging / "cancelled")
    spec = op.stage_spec(ti, stage_id=f"cancel-{uuid.uuid4().hex[:8]}", **fields)
    first, again = service.submit(spec), service.submit(spec)
    assert first["stage_id"] == again["stage_id"] and first["submitted"] == again["submitted"]
    stage_process = wait_for_processes("ray::tests.cancelled", timeout=120)[0]
    assert len(processes("ray::tests.cancelled")) == 1  # one stage ran, not two
    # Its status shows Ray Data's progress: the stage's operators, as the dashboard's Ray Data page does.
    deadline = time.monotonic() + 30
    while not ((progress := service.status(spec.stage_id).get("progress")) and progress[0]["state"]):
        assert time.monotonic() < deadline, "the running stage's status never showed Ray Data's progress"
        time.sleep(0.5)
    names = [op["name"] for dataset in progress for op in dataset["operators"]]
    assert any("slow_double" in name for name in names) and progress[0]["state"] == "RUNNING", progress
    # ... with the rows and bytes read so far, and each operator's rows in and out.
    while not (status := service.status(spec.stage_id)).get("rows_read"):
        assert time.monotonic() < deadline + 60, f"the running stage's status never counted a row: {status}"
        time.sleep(0.5)
    assert status["state"] == "running" and status["rows_read"] <= 1600 and status["bytes_read"] > 0, status
    mapped = [op for dataset in status["progress"] for op in dataset["operators"] if "slow_double" in op["name"]]
    assert mapped and 0 < mapped[0]["rows_in"] <= 1600, status
    view = service.cancel(spec.stage_id)
    assert view["cancelled"] is True and view["state"] == "cancelled"
    stage_process.wait(timeout=30)
    assert service.status(spec.stage_id)["state"] == "cancelled"
    assert committed_attempts(staging, "cancelled") == []


def test_a_stage_nobody_asks_about_for_its_lease_is_cancelled_and_one_polled_runs_on(service_conn, tmp_path):
    """A task marked failed while deferred, before any triggerer polled its stage, or a worker
    that died: the service cancels the stage once its lease runs out with no request about it."""
    from tests.helpers import FakeTaskInstance

    service = RayHook().service()
    ref = committed_ids(tmp_path / "in", files=8, rows_per_file=100)
    staging = tmp_path / "staging"
    specs = {}
    for task_id in ("orphan", "polled"):
        op = slow_transform(task_id, ref, staging, fn_kwargs={"seconds": 2})
        ti = FakeTaskInstance(task_id=task_id)
        fields = op.stage_fields({"ti": ti})
        fields["output_uri"] = str(staging / task_id)
        specs[task_id] = op.stage_spec(ti, stage_id=f"{task_id}-{uuid.uuid4().hex[:8]}", **fields)
        service.submit(specs[task_id], lease_seconds=5)
    wait_for_processes("ray::tests.orphan", timeout=120)
    deadline = time.monotonic() + 120
    while processes("ray::tests.orphan"):
        assert time.monotonic() < deadline, "the stage nobody asked about was never cancelled"
        assert service.status(specs["polled"].stage_id)["state"] == "running"  # renews its lease only
        time.sleep(1)
    orphan = service.status(specs["orphan"].stage_id)
    assert orphan["state"] == "cancelled" and "lease" in orphan["error"]["message"], orphan
    while (polled := service.status(specs["polled"].stage_id))["state"] == "running":
        assert time.monotonic() < deadline, polled
        time.sleep(1)
    assert polled["state"] == "succeeded", polled
    assert committed_attempts(staging, "orphan") == [] and len(committed_attempts(staging, "polled")) == 1


def test_a_postgres_load_over_the_service_is_committed_once(service_conn, pg, tmp_path):
    ref = committed_ids(tmp_path / "in", files=2, rows_per_file=100)
    destination = {"kind": "postgres", "postgres_conn_id": pg.conn_id, "table": "public.ids"}
    for attempt in (1, 2):  # a retry of the same run's append publishes nothing twice
        op = RayDataLoadOperator(task_id="load_ids", input=ref, destination=destination, mode="append")
        load, _ = run_operator(op, try_number=attempt)
        assert load["skipped"] is (attempt == 2)
    assert pg.conn.execute("SELECT count(*), count(DISTINCT id) FROM public.ids").fetchone() == (200, 200)


def service_jobs(dashboard_url: str, port: int) -> list[dict]:
    jobs = JobsApi(dashboard_url, {}).call("GET", "/api/jobs/")
    return [j for j in jobs if (j.get("metadata") or {}).get("port") == str(port)]


def test_first_tasks_starting_together_start_one_service_job_and_a_killed_one_is_restarted_by_the_retry(
    ray_head, service_conn, monkeypatch, tmp_path
):
    port = free_port()  # a service of its own: this test stops it
    conn = {**service_conn, "host": f"http://127.0.0.1:{port}"}
    monkeypatch.setenv("AIRFLOW_CONN_RAYDATA_OWN", json.dumps(conn))
    errors: list[BaseException] = []

    def first_task() -> None:
        try:
            RayHook("raydata_own").service()
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    threads = [threading.Thread(target=first_task) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert errors == []
    jobs = service_jobs(ray_head.dashboard_url, port)
    assert [job["status"] for job in jobs] == ["RUNNING"], jobs

    ref = committed_ids(tmp_path / "in", files=8, rows_per_file=500)
    staging = tmp_path / "staging"
    op = slow_transform("service_kill", ref, staging, raydata_conn_id="raydata_own")
    thread, outcome = in_thread(lambda: run_operator(op)[0])
    wait_for_processes("ray::tests.service_kill", timeout=120)
    JobsApi(ray_head.dashboard_url, {}).call("POST", f"/api/jobs/{jobs[0]['submission_id']}/stop")
    thread.join(120)
    error = outcome.get("error")
    assert isinstance(error, AirflowException) and not isinstance(error, AirflowFailException), error
    assert f"http://127.0.0.1:{port}" in str(error)
    assert committed_attempts(staging, "service_kill") == []
    op = slow_transform("service_kill", ref, staging, raydata_conn_id="raydata_own")
    out, _ = run_operator(op, try_number=2)  # Airflow's retry: a new service job, and the stage completes
    assert out["num_rows"] == 4000 == pq.read_table(out["uri"]).num_rows
    running = [job for job in service_jobs(ray_head.dashboard_url, port) if job["status"] == "RUNNING"]
    assert len(running) == 1 and running[0]["submission_id"] != jobs[0]["submission_id"]
    JobsApi(ray_head.dashboard_url, {}).call("POST", f"/api/jobs/{running[0]['submission_id']}/stop")


def test_on_kill_over_the_service_cancels_the_stage_and_nothing_is_committed(service_conn, tmp_path):
    from tests.integration.test_faults import ON_KILL_SCRIPT

    RayHook().service()
    ref = committed_ids(tmp_path / "in", files=16, rows_per_file=500)
    staging = tmp_path / "staging"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    task = subprocess.Popen([sys.executable, "-c", ON_KILL_SCRIPT, json.dumps(ref), str(staging)], cwd=ROOT, env=env)
    try:
        stage = wait_for_processes("ray::tests.killed", timeout=120)[0]
        wait_for_processes("MapBatches(slow_double)")
        task.send_signal(signal.SIGTERM)  # Airflow: the task was marked failed or cleared
        stage.wait(timeout=30)
        assert task.wait(timeout=60) != 0
    finally:
        task.kill()
    assert committed_attempts(staging, "killed") == []


def test_the_triggerer_event_loop_stays_responsive_while_many_stages_are_polled(service_conn, tmp_path):
    """48 triggers (6 per stage, 8 stages of about 2 s each) in one event loop, as in a triggerer:
    a ticker measures how late the loop runs it. A blocking call in a trigger (a sync HTTP
    request, or an SSL context built per client: 40 ms each here, 48 at once) shows up as seconds."""
    import asyncio

    from airflow.sdk.exceptions import TaskDeferred

    from airflow_provider_raydata.triggers.raydata import RayDataStageTrigger

    ref = committed_ids(tmp_path / "in", files=2, rows_per_file=50)
    triggers = []
    for n in range(8):
        op = slow_transform(
            f"polled_{n}", ref, tmp_path / "stg", fn_kwargs={"seconds": 1}, deferrable=True, wait_before_deferring=0
        )
        with pytest.raises(TaskDeferred) as deferred:
            run_operator(op)
        kwargs = deferred.value.trigger.serialize()[1]
        triggers += [RayDataStageTrigger(**{**kwargs, "poll_interval": 0.5}) for _ in range(6)]

    async def watch() -> tuple[list, float]:
        lag, stop = 0.0, asyncio.Event()

        async def ticker() -> None:
            nonlocal lag
            while not stop.is_set():
                before = time.perf_counter()
                await asyncio.sleep(0.01)
                lag = max(lag, time.perf_counter() - before - 0.01)

        async def first_event(trigger: RayDataStageTrigger):
            async for event in trigger.run():
                return event.payload

        tick = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)
        events = await asyncio.gather(*(first_event(t) for t in triggers))
        stop.set()
        await tick
        return events, lag

    events, lag = asyncio.run(watch())
    assert [e["state"] for e in events] == ["succeeded"] * 48, events
    # Measured here: 0.05-0.17 s (garbage collection, 2 busy cores), 1.15 s once in a full run on a
    # slower machine; an SSL context per client (the blocking call this guards against): 2.7 s quiet.
    assert lag < 1.5, f"the event loop was blocked for {lag:.2f}s"
    assert len(committed_attempts(tmp_path / "stg", "*")) == 8


def test_a_deferrable_task_defers_only_a_stage_still_running_after_wait_before_deferring(service_conn, tmp_path):
    from airflow.sdk.exceptions import TaskDeferred

    quick = committed_ids(tmp_path / "quick", files=1, rows_per_file=10)
    op = slow_transform("quick", quick, tmp_path / "stg", fn_kwargs={"seconds": 0}, deferrable=True)
    out, _ = run_operator(op)  # ended within the wait: finished in the task, no trigger
    assert out["num_rows"] == 10 and len(committed_attempts(tmp_path / "stg", "quick")) == 1

    slow = committed_ids(tmp_path / "slow", files=4, rows_per_file=10)
    op = slow_transform(
        "slow", slow, tmp_path / "stg", fn_kwargs={"seconds": 3}, deferrable=True, wait_before_deferring=1
    )
    with pytest.raises(TaskDeferred) as deferred:
        run_operator(op)
    trigger = deferred.value.trigger
    # The trigger takes over the log after the lines the task already wrote.
    assert trigger.stage_id == op.hook.stage_id and trigger.log_offset == op.hook.log_offset > 0
    assert committed_attempts(tmp_path / "stg", "slow") == []  # still running
    op.hook.service().cancel(trigger.stage_id)

"""A PostgreSQL load killed with SIGKILL, and credentials that must never show: real PostgreSQL,
real Ray head over ray://, moto's S3 server for the staging area."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_provider_raydata.contracts import ProducedBy
from airflow_provider_raydata.operators import RayDataExtractOperator, RayDataLoadOperator
from airflow_provider_raydata.runtime import refs
from tests.conftest import ROOT
from tests.helpers import run_operator, staging_tables

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LOAD_SCRIPT = """
import json, sys
from airflow_provider_raydata.operators import RayDataLoadOperator
from tests.helpers import run_operator
ref = json.loads(sys.argv[1])
op = RayDataLoadOperator(task_id="load", input=ref, destination={"kind": "postgres", "postgres_conn_id": "pg_test",
                         "table": "facts"}, mode="append")
run_operator(op, run_id="scheduled__2024-01-02", try_number=1)
"""


def committed_ref(root, rows: int) -> dict:
    attempt = refs.new_attempt_uri(str(root), 1)
    os.makedirs(attempt)
    ids = pa.array(range(rows), pa.int64())
    table = pa.table({"id": ids, "value": pa.compute.multiply(ids, 3), "label": pa.array(["x" * 40] * rows)})
    for part in range(4):
        pq.write_table(table.slice(part * rows // 4, rows // 4), f"{attempt}/part-{part}.parquet")
    return refs.commit(attempt, None, ProducedBy()).to_dict()


def copying_into(conn, table: str) -> bool:
    query = "SELECT count(*) FROM pg_stat_progress_copy WHERE relid = to_regclass(%s)"
    return conn.execute(query, [table]).fetchone()[0] > 0


def test_sigkill_during_load_leaves_target_unchanged_and_retry_loads_once(ray_head, pg, tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_RAYDATA_DEFAULT", json.dumps(ray_head.connection()))
    pg.conn.execute("CREATE TABLE facts (id bigint, value bigint, label text)")
    pg.conn.execute("INSERT INTO facts SELECT i, i, 'before' FROM generate_series(1, 10) AS i")
    ref = committed_ref(tmp_path / "ref", 800_000)

    task = subprocess.Popen(
        [sys.executable, "-c", LOAD_SCRIPT, json.dumps(ref)], cwd=ROOT, env=dict(os.environ), start_new_session=True
    )
    deadline = time.monotonic() + 180  # a new Ray Client session may need RayHook's retry (~40 s each)
    while not copying_into(pg.conn, "facts"):  # the COPY has begun on the cluster
        assert task.poll() is None, "the load finished before it could be killed"
        assert time.monotonic() < deadline, "the load never started"
        time.sleep(0.05)
    os.killpg(task.pid, signal.SIGKILL)
    task.wait()

    assert pg.conn.execute("SELECT count(*), min(label) FROM facts").fetchone() == (10, "before")
    time.sleep(5)  # the orphaned stage goes on copying, inside a transaction nobody commits
    assert pg.conn.execute("SELECT count(*) FROM facts").fetchone()[0] == 10

    op = RayDataLoadOperator(
        task_id="load",
        input=ref,
        destination={"kind": "postgres", "postgres_conn_id": pg.conn_id, "table": "facts"},
        mode="append",
    )
    result, _ = run_operator(op, run_id="scheduled__2024-01-02", try_number=2)  # Airflow's retry
    assert result["rows_written"] == 800_000 and not result["skipped"]
    assert pg.conn.execute("SELECT count(*), count(DISTINCT id) FROM facts").fetchone() == (800_010, 800_000)
    result, _ = run_operator(op, run_id="scheduled__2024-01-02", try_number=3)  # e.g. a cleared task
    assert result["skipped"]
    assert pg.conn.execute("SELECT count(*) FROM facts").fetchone()[0] == 800_010
    assert staging_tables(pg.conn) == []


PLANTED_PG = "pl4nted-PG-pw-7d1e"
PLANTED_S3 = "pl4nted-S3-secret-93fa"


def test_planted_credentials_appear_nowhere(ray_head, pg, s3_server, tmp_path, monkeypatch, capfd, caplog):
    """Passwords planted in a postgres and an aws connection: not in logs, XCom, errors or Ray's listings."""
    import logging

    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors, list_tasks

    caplog.set_level(logging.DEBUG)
    options = s3_server["options"]
    pg.conn.execute(f"CREATE ROLE leaky LOGIN SUPERUSER PASSWORD '{PLANTED_PG}'")
    pg.conn.execute("CREATE TABLE src AS SELECT i AS id, 'row ' || i AS name FROM generate_series(1, 500) AS i")
    pg_conn = {"conn_type": "postgres", "host": "127.0.0.1", "port": pg.params["port"], "login": "leaky"}
    aws_conn = {
        "conn_type": "aws",
        "login": options["aws_access_key_id"],
        "password": PLANTED_S3,
        "extra": {"endpoint_url": options["endpoint_url"], "region_name": "us-east-1"},
    }
    monkeypatch.setenv(
        "AIRFLOW_CONN_PG_LEAK", json.dumps({**pg_conn, "password": PLANTED_PG, "schema": pg.params["dbname"]})
    )
    monkeypatch.setenv("AIRFLOW_CONN_S3_LEAK", json.dumps(aws_conn))
    monkeypatch.setenv("AIRFLOW_CONN_RAYDATA_DEFAULT", json.dumps(ray_head.connection()))
    common = {"aws_conn_id": "s3_leak", "staging_uri": "s3://lake/leak-staging"}

    extract = RayDataExtractOperator(
        task_id="extract", source={"kind": "postgres", "postgres_conn_id": "pg_leak", "table": "src"}, **common
    )
    ref, extract_ti = run_operator(extract)
    assert ref["uri"].startswith("s3://lake/leak-staging/") and ref["num_rows"] == 500
    load = RayDataLoadOperator(
        task_id="load",
        input=ref,
        destination={"kind": "postgres", "postgres_conn_id": "pg_leak", "table": "copied"},
        **common,
    )
    result, load_ti = run_operator(load)
    assert result["rows_written"] == 500
    errors = []
    for bad in ({"table": "src", "mode": "upsert", "keys": ["nope"]}, {"table": "missing_schema.t"}):
        broken = RayDataLoadOperator(
            task_id="broken",
            input=ref,
            destination={"kind": "postgres", "postgres_conn_id": "pg_leak", **bad},
            **common,
        )
        with pytest.raises(Exception) as failure:
            run_operator(broken)
        errors.append("".join(traceback.format_exception(failure.value)))
    wrong = RayDataExtractOperator(  # a rejected login: the error must not echo what was sent
        task_id="wrong", source={"kind": "postgres", "postgres_conn_id": "pg_wrong", "table": "src"}, **common
    )
    monkeypatch.setenv("AIRFLOW_CONN_PG_WRONG", json.dumps({**pg_conn, "password": PLANTED_PG + "x"}))
    with pytest.raises(Exception) as failure:
        run_operator(wrong)
    errors.append("".join(traceback.format_exception(failure.value)))
    assert "Unknown column 'nope'" in errors[0] and "password authentication failed" in errors[2]

    dashboard = ray_head.dashboard_url
    listings = [
        json.dumps([t for t in list_tasks(address=dashboard, detail=True, limit=10_000)], default=str),
        json.dumps([a for a in list_actors(address=dashboard, detail=True, limit=10_000)], default=str),
        json.dumps([j.dict() for j in JobSubmissionClient(dashboard).list_jobs()], default=str),
    ]
    ray_logs = [
        open(os.path.join(folder, name), errors="replace").read()
        for folder, _, names in os.walk(ray_head.temp_dir)
        for name in names
        if name.endswith((".log", ".out", ".err"))
    ]
    captured = capfd.readouterr()
    places = {
        "task log": caplog.text + captured.out + captured.err,
        "XCom": json.dumps([extract_ti.xcoms, load_ti.xcoms], default=str),
        "exceptions": "\n".join(errors),
        "Ray task/actor/job listings": "\n".join(listings),
        "Ray log files": "\n".join(ray_logs),
    }
    assert len(places["Ray task/actor/job listings"]) > 1000  # the listings were really read
    for secret in (PLANTED_PG, PLANTED_S3):
        leaks = [where for where, text in places.items() if secret in text]
        assert leaks == [], f"{secret} leaked into {leaks}"


def test_a_load_is_published_only_when_its_task_commits(ray_head, pg, tmp_path, monkeypatch):
    """The stage returns with its rows in an open transaction: invisible until the task commits,
    and rolled back when the task is killed (on_kill) before it does."""
    from airflow.sdk.exceptions import AirflowException

    from airflow_provider_raydata.hooks.ray import RayHook

    monkeypatch.setenv("AIRFLOW_CONN_RAYDATA_DEFAULT", json.dumps(ray_head.connection()))
    pg.conn.execute("CREATE TABLE facts (id bigint, value bigint, label text)")
    ref = committed_ref(tmp_path / "ref", 1000)
    seen = []
    commit = RayHook.commit_held_load

    def observed_commit(hook, commit_it: bool = True) -> None:
        seen.append(pg.conn.execute("SELECT count(*) FROM facts").fetchone()[0])
        commit(hook, commit_it)

    monkeypatch.setattr(RayHook, "commit_held_load", observed_commit)
    destination = {"kind": "postgres", "postgres_conn_id": pg.conn_id, "table": "facts"}
    op = RayDataLoadOperator(task_id="load", input=ref, destination=destination, mode="append")
    run_operator(op, run_id="run-1")
    assert seen == [0]  # the stage had finished; nothing was visible before the commit
    assert pg.conn.execute("SELECT count(*) FROM facts").fetchone()[0] == 1000

    def killed_before_commit(hook, commit_it: bool = True) -> None:
        hook.cancel()  # what on_kill does when the task is marked failed at this moment
        commit(hook, commit_it)

    monkeypatch.setattr(RayHook, "commit_held_load", killed_before_commit)
    op = RayDataLoadOperator(task_id="load", input=ref, destination=destination, mode="append")
    with pytest.raises(AirflowException, match="rolled back before this task could commit it"):
        run_operator(op, run_id="run-2")
    assert pg.conn.execute("SELECT count(*) FROM facts").fetchone()[0] == 1000


def test_replace_partition_matches_the_targets_column_types(ray_head, pg, tmp_path, monkeypatch):
    """Partition values read from Parquet as text still match a date column: the day is replaced."""
    monkeypatch.setenv("AIRFLOW_CONN_RAYDATA_DEFAULT", json.dumps(ray_head.connection()))
    pg.conn.execute("CREATE TABLE daily (day date, amount bigint)")
    pg.conn.execute("INSERT INTO daily VALUES ('2024-01-01', 1), ('2024-01-02', 2), ('2024-01-02', 3)")
    attempt = refs.new_attempt_uri(str(tmp_path / "ref"), 1)
    os.makedirs(attempt)
    pq.write_table(
        pa.table({"day": ["2024-01-02"] * 4, "amount": pa.array([10] * 4, pa.int64())}), f"{attempt}/p.parquet"
    )
    ref = refs.commit(attempt, None, ProducedBy()).to_dict()
    destination = {"kind": "postgres", "postgres_conn_id": pg.conn_id, "table": "daily"}
    for run_id in ("run-1", "run-2"):
        op = RayDataLoadOperator(
            task_id="load", input=ref, destination=destination, mode="replace_partition", partition_by=["day"]
        )
        result, _ = run_operator(op, run_id=run_id)
        assert result["partitions"] == ["2024-01-02"]
        rows = pg.conn.execute("SELECT day::text, sum(amount), count(*) FROM daily GROUP BY 1 ORDER BY 1").fetchall()
        assert rows == [("2024-01-01", 1, 1), ("2024-01-02", 40, 4)]

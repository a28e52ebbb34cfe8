"""The control plane, both transports in the same run on the same Ray head:
the Ray Client (``ray://``) and the stage service's HTTP API (``http://``, deferrable operators).

    python benchmarks/control_plane.py [--days 7] [--orders-per-day 15000] [--repeats 3]
                                       [--transports service ray_client] [--parts overhead backfill]

Starts its own Ray head (2 CPUs) and generates the daily DAG's sample source (one day of
15,000 orders is about TPC-H SF 0.01: 15,000 orders and ~60,000 lines), then per transport:

  task_overhead   ``airflow tasks test`` of the daily DAG's ``extract_lineitem`` (not deferred: the
                  process waits for its stage): a real Airflow task process, timed from outside.
                  Its control overhead is its wall time minus a no-op task's (``airflow tasks
                  test`` of a task that does nothing: Airflow's own start-up) minus the stage's
                  time on the cluster. Peak RSS of the task process.
  backfill        ``airflow backfill create`` of the daily DAG over ``--days`` days on a real
                  deployment (scheduler, dag-processor, api-server, triggerer; LocalExecutor with
                  4 tasks at once; deferrable operators on the service): wall time until every run
                  is final.
  slots           one stage of about 16 s (8 files, 2 s each on 2 CPUs): how many Airflow worker
                  slots (running task instances) it holds while it runs on the cluster.

Writes ``benchmarks/results/control_plane.json`` (a run of some parts updates the others in place).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from tests.airflow_stack import AirflowStack  # noqa: E402
from tests.services import BIN, RayHead, free_port  # noqa: E402

TOKEN = "raydata-benchmark-token"
FINISHED = re.compile(r"extract stage \S+ finished in ([\d.]+)s")

BENCH_DAGS = """
import json
from datetime import datetime

from airflow.sdk import DAG, task

from airflow_provider_raydata.operators import RayDataTransformOperator
from tests.slow_functions import slow_double

with DAG("bench_noop", schedule=None, start_date=datetime(2024, 1, 1), catchup=False):

    @task
    def noop() -> None:
        pass

    noop()

with DAG("bench_slots", schedule=None, start_date=datetime(2024, 1, 1), catchup=False):
    RayDataTransformOperator(
        task_id="slow", input=json.loads({ref!r}), fn=slow_double, fn_kwargs={{"seconds": 2}},
        batch_size=None, staging_uri={staging!r}, poll_interval=0.5,
    )
"""


def connections(head: RayHead, service_url: str, staging: Path) -> dict[str, dict]:
    extra = {"dashboard_url": head.dashboard_url, "staging_uri": str(staging)}
    return {
        "ray_client": {**head.connection(**extra)},
        "service": {"conn_type": "raydata", "host": service_url, "password": TOKEN, "extra": extra},
    }


def environment(home: Path, dags: Path, source: Path, lake: Path, conn: dict, deferrable: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    return {
        **env,
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW_CONN_RAYDATA_DEFAULT": json.dumps(conn),
        "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": str(deferrable),
        "RAYDATA_SOURCE_URI": str(source),
        "RAYDATA_LAKE_URI": str(lake),
        "PYTHONPATH": str(ROOT),
    }


def timed_process(args: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MB) and output of one process."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        out.seek(0)
        text = out.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{text[-3000:]}")
    return wall, usage.ru_maxrss / 1024, text


def task_overhead(env: dict[str, str], repeats: int) -> dict:
    airflow = str(BIN / "airflow")
    noop = [timed_process([airflow, "tasks", "test", "bench_noop", "noop"], env)[0] for _ in range(repeats)]
    runs = []
    for _ in range(repeats + 1):  # the first run also starts the service job (or a client session)
        wall, rss, text = timed_process(
            [airflow, "tasks", "test", "raydata_daily_batch", "extract_lineitem", "2024-01-02"], env
        )
        cluster = float(FINISHED.findall(text)[-1])
        runs.append({"wall_seconds": round(wall, 2), "cluster_seconds": cluster, "peak_rss_mb": round(rss, 1)})
    warm = runs[1:]
    noop_wall = statistics.median(noop)
    wall = statistics.median(r["wall_seconds"] for r in warm)
    cluster = statistics.median(r["cluster_seconds"] for r in warm)
    return {
        "first_run": runs[0],
        "warm_runs": warm,
        "noop_task_wall_seconds": round(noop_wall, 2),
        "task_wall_seconds": wall,
        "cluster_seconds": cluster,
        "control_overhead_seconds": round(wall - noop_wall - cluster, 2),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in warm),
    }


def backfill_and_slots(env: dict[str, str], home: Path, dags: Path, days: int) -> dict:
    stack_env = {k: v for k, v in env.items() if k.startswith(("AIRFLOW_CONN", "AIRFLOW__OPERATORS", "RAYDATA"))}
    stack_env.update(PYTHONPATH=str(ROOT), AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE="False")
    with AirflowStack(home, dags, stack_env, parallelism=4, triggerer=True) as stack:
        stack.wait_for_dag("raydata_daily_batch")
        started = time.perf_counter()
        last = f"2024-01-{days:02d}"
        runs = stack.backfill("raydata_daily_batch", "2024-01-01", last, timeout=7200)
        wall = time.perf_counter() - started
        assert [r["state"] for r in runs] == ["success"] * days, runs
        tasks = stack.api("GET", "dags/raydata_daily_batch/dagRuns/~/taskInstances")["total_entries"]
        return {"backfill": {"days": days, "tasks": tasks, "wall_seconds": round(wall, 1)}, "slots": slots(stack)}


def slots(stack: AirflowStack) -> dict:
    """Sample the deployment's running task instances while the probe's stage runs on the cluster."""
    from tests.integration.test_faults import processes

    stack.wait_for_dag("bench_slots")
    stack.unpause("bench_slots")
    run_id = stack.api("POST", "dags/bench_slots/dagRuns", json={"logical_date": None})["dag_run_id"]
    samples: list[dict[str, int]] = []
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        on_cluster = bool(processes("ray::bench_slots.slow"))
        ti = stack.task_instance("bench_slots", run_id, "slow")
        if ti["state"] in ("success", "failed"):
            break
        if on_cluster:
            running = stack.api("GET", "dags/~/dagRuns/~/taskInstances", state="running")["total_entries"]
            samples.append({"running": running, "deferred": int(ti["state"] == "deferred")})
        time.sleep(0.5)
    assert ti["state"] == "success", ti
    return {
        "samples_while_on_cluster": len(samples),
        "max_slots_held": max(s["running"] for s in samples),
        "share_of_samples_deferred": round(sum(s["deferred"] for s in samples) / len(samples), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--orders-per-day", type=int, default=15000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--transports", nargs="+", default=["service", "ray_client"])
    parser.add_argument("--parts", nargs="+", default=["overhead", "backfill"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "control_plane.json"))
    args = parser.parse_args()

    import sample_data

    from tests.integration.test_faults import committed_ids

    work = Path(tempfile.mkdtemp(prefix="bench-control-"))
    source = work / "source"
    sample_data.generate(str(source), "2024-01-01", f"2024-01-{args.days:02d}", orders_per_day=args.orders_per_day)
    dags = work / "dags"
    dags.mkdir()
    (dags / "raydata_daily_batch.py").symlink_to(ROOT / "dags" / "raydata_daily_batch.py")
    probe = committed_ids(work / "probe_in", files=8, rows_per_file=100)
    (dags / "bench.py").write_text(BENCH_DAGS.format(ref=json.dumps(probe), staging=str(work / "probe_staging")))

    head = RayHead(Path(tempfile.mkdtemp(prefix="rayc-")))
    head.start()
    service_url = f"http://127.0.0.1:{free_port()}"
    out = Path(args.out)
    # A run of some parts or transports updates the others' figures in place.
    results: dict = json.loads(out.read_text()) if out.exists() else {"transports": {}}
    results.update(cluster="ray start --head --num-cpus=2 on this machine", orders_per_day=args.orders_per_day)
    try:
        for transport in args.transports:
            conn = connections(head, service_url, work / f"staging-{transport}")[transport]
            home = work / f"home-{transport}"
            # The task measured in its own process, waiting for its stage; in the deployment every
            # operator defers where the connection allows it (the service; ray:// tasks wait in their slot).
            env = environment(home, dags, source, work / f"lake-{transport}", conn, deferrable=False)
            measured = results["transports"].setdefault(transport, {})
            if "overhead" in args.parts:
                subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, check=True, capture_output=True)
                measured["task_overhead"] = task_overhead(env, args.repeats)
                print(json.dumps({transport: measured}, indent=2), flush=True)
            if "backfill" in args.parts:
                env = environment(home, dags, source, work / f"lake-{transport}", conn, deferrable=True)
                measured.update(backfill_and_slots(env, work / f"stack-{transport}", dags, args.days))
                print(json.dumps({transport: measured}, indent=2), flush=True)
    finally:
        head.stop()
    found = results["transports"]
    if all("backfill" in found.get(t, {}) for t in ("service", "ray_client")):
        results["backfill_speedup_service_over_ray_client"] = round(
            found["ray_client"]["backfill"]["wall_seconds"] / found["service"]["backfill"]["wall_seconds"], 2
        )
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""The control plane, both transports in the same run on the same Ray head:
the Ray Client (``ray://``) and the stage service's HTTP API (``http://``, deferrable operators).

    python benchmarks/control_plane.py [--days 7] [--orders-per-day 15000] [--repeats 5]
                                       [--transports service ray_client]
                                       [--parts overhead backfill backfill_not_deferred]

Starts its own Ray head (2 CPUs) and generates the daily DAG's sample source (one day of
15,000 orders is about TPC-H SF 0.01: 15,000 orders and ~60,000 lines), then per transport:

  task_overhead   ``airflow tasks test`` of the daily DAG's ``extract_lineitem`` (not deferred: the
                  process waits for its stage): a real Airflow task process, timed from outside.
                  Its control overhead is its wall time minus a no-op task's (``airflow tasks
                  test`` of a task that does nothing: Airflow's own start-up), run just before it,
                  minus the stage's time on the cluster; the median of ``--repeats`` pairs. Peak
                  RSS of the task process.
  backfill        ``airflow backfill create`` of the daily DAG over ``--days`` days on a real
                  deployment (scheduler, dag-processor, api-server, triggerer; LocalExecutor with
                  4 tasks at once; deferrable operators on the service, and on the service
                  again without deferral): wall time until every run is final, tasks retried.
  slots           one stage of about 16 s (8 files, 2 s each on 2 CPUs): how many Airflow worker
                  slots (running task instances) it holds while it runs on the cluster, and while
                  its task is deferred (after ``wait_before_deferring``, 5 s by default).

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
    """Pairs of runs, a no-op task then the extract, so that each difference compares runs made
    under the same load: Airflow's own start-up varies by a second or two between runs here."""
    airflow = str(BIN / "airflow")
    extract = [airflow, "tasks", "test", "raydata_daily_batch", "extract_lineitem", "2024-01-02"]
    noop = [airflow, "tasks", "test", "bench_noop", "noop"]

    def run(args: list[str]) -> dict:
        wall, rss, text = timed_process(args, env)
        found = FINISHED.findall(text)
        cluster = float(found[-1]) if found else 0.0
        return {"wall_seconds": round(wall, 2), "cluster_seconds": cluster, "peak_rss_mb": round(rss, 1)}

    first = run(extract)  # also starts the service job (or a client session's server)
    pairs = [{"noop": run(noop), "task": run(extract)} for _ in range(repeats)]
    for pair in pairs:
        task = pair["task"]
        pair["overhead_seconds"] = round(
            task["wall_seconds"] - pair["noop"]["wall_seconds"] - task["cluster_seconds"], 2
        )
    return {
        "first_run": first,
        "pairs": pairs,
        "noop_task_wall_seconds": statistics.median(p["noop"]["wall_seconds"] for p in pairs),
        "task_wall_seconds": statistics.median(p["task"]["wall_seconds"] for p in pairs),
        "cluster_seconds": statistics.median(p["task"]["cluster_seconds"] for p in pairs),
        "control_overhead_seconds": statistics.median(p["overhead_seconds"] for p in pairs),
        "peak_rss_mb": max(p["task"]["peak_rss_mb"] for p in pairs),
        "noop_peak_rss_mb": max(p["noop"]["peak_rss_mb"] for p in pairs),
    }


def backfill_and_slots(env: dict[str, str], home: Path, dags: Path, days: int, probe_slots: bool = True) -> dict:
    stack_env = {k: v for k, v in env.items() if k.startswith(("AIRFLOW_CONN", "AIRFLOW__OPERATORS", "RAYDATA"))}
    stack_env.update(PYTHONPATH=str(ROOT), AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE="False")
    with AirflowStack(home, dags, stack_env, parallelism=4, triggerer=True) as stack:
        stack.wait_for_dag("raydata_daily_batch")
        started = time.perf_counter()
        last = f"2024-01-{days:02d}"
        runs = stack.backfill("raydata_daily_batch", "2024-01-01", last, timeout=7200)
        wall = time.perf_counter() - started
        assert [r["state"] for r in runs] == ["success"] * days, runs
        tis = stack.api("GET", "dags/raydata_daily_batch/dagRuns/~/taskInstances", limit=1000)["task_instances"]
        backfill = {
            "days": days,
            "tasks": len(tis),
            "tasks_retried": sum(1 for ti in tis if ti["try_number"] > 1),
            "wall_seconds": round(wall, 1),
        }
        return {"backfill": backfill, **({"slots": slots(stack)} if probe_slots else {})}


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
    deferred = [s["running"] for s in samples if s["deferred"]]
    return {
        "samples_while_on_cluster": len(samples),
        "max_slots_held": max(s["running"] for s in samples),
        "max_slots_held_while_deferred": max(deferred) if deferred else None,
        "share_of_samples_deferred": round(len(deferred) / len(samples), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--orders-per-day", type=int, default=15000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--transports", nargs="+", default=["service", "ray_client"])
    parser.add_argument("--parts", nargs="+", default=["overhead", "backfill", "backfill_not_deferred"])
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
            if "backfill_not_deferred" in args.parts and transport == "service":
                # Deferral costs a second task process per task (Airflow's start-up, twice): for
                # stages of a second or two it costs more than the slot it frees.
                env = environment(home, dags, source, work / f"lake-{transport}-nd", conn, deferrable=False)
                done = backfill_and_slots(env, work / f"stack-{transport}-nd", dags, args.days, probe_slots=False)
                measured["backfill_not_deferred"] = done["backfill"]
                print(json.dumps({transport: measured}, indent=2), flush=True)
    finally:
        head.stop()
    found = results["transports"]
    ray_client = found.get("ray_client", {}).get("backfill")
    for key in ("backfill", "backfill_not_deferred"):
        service = found.get("service", {}).get(key)
        if ray_client and service:
            results[f"{key}_speedup_service_over_ray_client"] = round(
                ray_client["wall_seconds"] / service["wall_seconds"], 2
            )
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

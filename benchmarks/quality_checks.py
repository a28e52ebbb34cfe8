"""About 15 data-quality checks on TPC-H lineitem: the quality stage's one pass against the same
checks as one Ray Data pass each, and against one plain full scan, on the same cluster in one run.

    python benchmarks/quality_checks.py [--scale 1] [--repeats 2] [--out benchmarks/results/quality_checks.json]

Starts its own Ray head (2 CPUs, reached over ray://), generates lineitem with tpchgen-cli and
stages it as a committed dataset reference (8 Parquet files, string_view cast to string). Each
variant runs inside one remote task on the cluster, as a stage does:
  full_scan        read the 12 columns the checks read and pass every batch through map_batches
                   (returning its row count): a plain ``count()`` could answer from Parquet metadata.
                   One untimed scan first starts the workers.
  quality_stage    the runtime's quality stage, ``run_stage`` (schema validation, the one pass,
                   merge, quarantine commit; the output is the input reference: nothing fails)
  separate_passes  the same checks with the same code, one Ray Data pass per check
Then the operator path once: ``RayDataQualityOperator.execute`` through RayHook over ray://.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="raydata-bench-airflow-"))

from tests.helpers import run_operator  # noqa: E402
from tests.services import BIN, RayHead  # noqa: E402

CHECKS = [
    {"check": "row_count", "geq_to": 1},
    {"check": "schema", "columns": {"l_orderkey": "int64", "l_shipdate": "date32"}, "allow_extra": True},
    {"check": "unique", "columns": ["l_orderkey", "l_linenumber"]},
    {"check": "not_null", "column": "l_orderkey"},
    {"check": "null_fraction", "column": "l_comment", "leq_to": 0.01},
    {"check": "distinct_count", "column": "l_shipmode", "equal_to": 7},
    {"check": "accepted_values", "column": "l_returnflag", "values": ["A", "N", "R"]},
    {"check": "accepted_values", "column": "l_linestatus", "values": ["O", "F"]},
    {"check": "range", "column": "l_quantity", "min": 1, "max": 50},
    {"check": "range", "column": "l_discount", "min": 0, "max": 0.1},
    {"check": "mean", "column": "l_extendedprice", "equal_to": 38000, "tolerance": 0.1},
    {"check": "sum", "column": "l_quantity", "geq_to": 0},
    {"check": "min", "column": "l_shipdate", "geq_to": "1992-01-01"},
    {"check": "max", "column": "l_receiptdate", "leq_to": "1999-01-01"},
    {"check": "regex", "column": "l_shipinstruct", "pattern": "^(DELIVER IN PERSON|COLLECT COD|NONE|TAKE BACK .*)$"},
    {"check": "predicate", "expr": "l_receiptdate > l_shipdate"},
    {"check": "string_length", "column": "l_comment", "max": 44},
]


def generate(data: Path, scale: float, files: int = 8) -> dict:
    """lineitem as a committed reference: ``files`` Parquet files, strings as ``string``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from airflow_provider_raydata.contracts import ProducedBy
    from airflow_provider_raydata.runtime import refs

    raw = data / f"sf{scale:g}" / "lineitem.parquet"
    if not raw.exists():
        raw.parent.mkdir(parents=True, exist_ok=True)
        cmd = [str(BIN / "tpchgen-cli"), "parquet", "-s", f"{scale:g}", f"--output-dir={raw.parent}"]
        subprocess.run([*cmd, "--tables=lineitem"], check=True)
    staged = data / f"sf{scale:g}" / "ref"
    marker = next(staged.glob("attempt-*/_SUCCESS"), None)
    if marker is not None:
        return json.loads(marker.read_text())
    source = pq.ParquetFile(raw)
    fields = source.schema_arrow
    schema = pa.schema([f.with_type(pa.string()) if pa.types.is_string_view(f.type) else f for f in fields])
    attempt = refs.new_attempt_uri(str(staged), 1)
    os.makedirs(attempt)
    per_file = -(-source.metadata.num_rows // files)
    writer, written, index = None, 0, 0
    for batch in source.iter_batches(batch_size=100_000):
        if writer is None or written >= per_file:
            if writer is not None:
                writer.close()
            writer, written, index = pq.ParquetWriter(f"{attempt}/part-{index}.parquet", schema), 0, index + 1
        writer.write_table(pa.Table.from_batches([batch]).cast(schema))
        written += batch.num_rows
    writer.close()
    return refs.commit(attempt, None, ProducedBy(dag_id="benchmark", task_id="quality_checks")).to_dict()


def full_scan(uri: str, columns: list[str]) -> dict:
    import ray.data

    from airflow_provider_raydata.runtime.runner import configure

    configure(None)
    started = time.perf_counter()
    ds = ray.data.read_parquet(uri, partitioning=None).select_columns(columns)  # as the quality stage reads
    batches = ds.map_batches(
        lambda t: {"rows": [t.num_rows], "bytes": [t.nbytes]}, batch_format="pyarrow", batch_size=None
    ).take_all()
    return {"seconds": time.perf_counter() - started, "rows": sum(b["rows"] for b in batches)}


def quality_stage(ref: dict, checks: list[dict], output_uri: str) -> dict:
    from airflow_provider_raydata.contracts import DatasetRef, ProducedBy, StageSpec
    from airflow_provider_raydata.runtime.runner import run_stage

    spec = StageSpec(
        stage="quality",
        name="benchmark.quality",
        produced_by=ProducedBy(),
        input=DatasetRef.parse(ref),
        checks=tuple(checks),
        output_uri=output_uri,
    )
    result = run_stage(spec)
    report = result.report.to_dict()
    return {
        "seconds": result.metrics.seconds,
        "rows": report["rows_in"],
        "failed_checks": [c["name"] for c in report["checks"] if not c["passed"]],
        "report": report,
    }


def separate_passes(ref: dict, checks: list[dict]) -> dict:
    from airflow_provider_raydata.contracts import DatasetRef
    from airflow_provider_raydata.runtime.checks import run_checks
    from airflow_provider_raydata.runtime.runner import configure
    from airflow_provider_raydata.runtime.sources import read_ref

    configure(None)
    started, per_check = time.perf_counter(), {}
    for check in checks:
        begin = time.perf_counter()
        report = run_checks(read_ref(DatasetRef.parse(ref), None)[0], [check], None)[0].to_dict()
        per_check[report["checks"][0]["name"]] = round(time.perf_counter() - begin, 2)
    return {"seconds": time.perf_counter() - started, "rows": report["rows_in"], "per_check": per_check}


def operator_run(ref: dict, staging: str) -> dict:
    from airflow_provider_raydata.operators import RayDataQualityOperator

    started = time.perf_counter()
    _, ti = run_operator(RayDataQualityOperator(task_id="quality", input=ref, checks=CHECKS, staging_uri=staging))
    return {"wall_seconds": round(time.perf_counter() - started, 2), "cluster_seconds": ti.xcoms["metrics"]["seconds"]}


def connect(address: str, attempts: int = 5) -> None:
    """A fresh head's client server sometimes refuses the first session (see DESIGN.md): retry."""
    import ray

    for attempt in range(attempts):
        try:
            ray.init(address, log_to_driver=False)
            return
        except ConnectionError:
            if attempt == attempts - 1:
                raise
            time.sleep(3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality_checks.json"))
    parser.add_argument("--data", default=str(ROOT / ".bench" / "tpch-quality"))
    args = parser.parse_args()
    import ray

    from airflow_provider_raydata.runtime.specs import columns_used

    ref = generate(Path(args.data), args.scale)
    columns = list(dict.fromkeys(c for check in CHECKS for c in columns_used(check)))
    work = tempfile.mkdtemp(prefix="bench-quality-")
    head = RayHead(Path(tempfile.mkdtemp(prefix="rayq-")))
    head.start()
    os.environ["AIRFLOW_CONN_RAYDATA_DEFAULT"] = json.dumps(head.connection())
    runs: dict[str, list[dict]] = {"full_scan": [], "quality_stage": [], "separate_passes": []}
    try:
        connect(head.address)
        variants = {"full_scan": full_scan, "quality_stage": quality_stage, "separate_passes": separate_passes}
        remote = {name: ray.remote(num_cpus=0)(fn) for name, fn in variants.items()}
        ray.get(remote["full_scan"].remote(ref["uri"], columns))  # warm-up: starts the workers, not timed
        for repeat in range(args.repeats):  # interleaved, so that noise hits every variant alike
            runs["full_scan"].append(ray.get(remote["full_scan"].remote(ref["uri"], columns)))
            runs["quality_stage"].append(ray.get(remote["quality_stage"].remote(ref, CHECKS, f"{work}/q{repeat}")))
            runs["separate_passes"].append(ray.get(remote["separate_passes"].remote(ref, CHECKS)))
            print(json.dumps({k: round(v[-1]["seconds"], 2) for k, v in runs.items()}), flush=True)
        ray.shutdown()
        operator = [operator_run(ref, f"{work}/staging") for _ in range(2)]  # the first starts the executor service
    finally:
        head.stop()
    best = {name: round(min(r["seconds"] for r in results), 2) for name, results in runs.items()}
    assert {r["rows"] for results in runs.values() for r in results} == {ref["num_rows"]}, "row counts differ"
    report = runs["quality_stage"][0].pop("report")
    for r in runs["quality_stage"][1:]:
        r.pop("report")
    result = {
        "cluster": "ray start --head --num-cpus=2 here, over ray://; each variant in one remote task",
        "scale_factor": args.scale,
        "lineitem_rows": ref["num_rows"],
        "input": {"files": ref["num_files"], "size_bytes": ref["size_bytes"]},
        "checks": len(CHECKS),
        "columns_read": columns,
        "seconds_best_of": args.repeats,
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "best_seconds": best,
        "ratio_quality_to_full_scan": round(best["quality_stage"] / best["full_scan"], 2),
        "ratio_separate_to_quality": round(best["separate_passes"] / best["quality_stage"], 2),
        "ratio_quality_to_full_scan_per_repeat": [  # each repeat ran its variants back to back
            round(q["seconds"] / f["seconds"], 2) for q, f in zip(runs["quality_stage"], runs["full_scan"], strict=True)
        ],
        "runs": runs,
        "operator": operator,
        "report": {k: report[k] for k in ("passed", "rows_in", "rows_passed", "rows_quarantined", "score")}
        | {"checks": [{k: c[k] for k in ("name", "value", "passed")} for c in report["checks"]]},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("best_seconds", "ratio_quality_to_full_scan", "operator")}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""The daily pipeline at TPC-H scale: the provider's operators, over each transport, against the
same work written by hand as one Ray Data driver on the same cluster, in the same run.

    python benchmarks/daily_pipeline.py [--scale 1 0.1] [--transports ray_client service]
                                        [--out benchmarks/results/daily_pipeline.json]

Starts its own Ray head (2 CPUs), generates TPC-H data with tpchgen-cli, then per scale factor:
  handwritten_default  one remote task, Ray Data's default settings
  handwritten_tuned    one remote task, the runtime's settings, broadcast joins and two-phase aggregation
  operators            Extract x4, Transform, Quality, Load through RayHook, one ray:// session each
  operators_service    the same over the stage service's HTTP API (http://; its job started beforehand,
                       as in a deployment where it runs all day)
Reports wall seconds per stage, rows/s and this (Airflow-side) process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
from tests.services import BIN, RayHead, free_port  # noqa: E402

YEAR = ("1995-01-01", "1996-01-01")
MONEY = {"l_extendedprice": "float64", "l_discount": "float64", "l_tax": "float64", "l_quantity": "float64"}
DIMENSIONS = {
    "orders": ["o_orderkey", "o_custkey"],
    "customer": ["c_custkey", "c_nationkey", "c_mktsegment"],
    "nation": ["n_nationkey", "n_name"],
}
SEGMENTS = ["AUTOMOBILE", "BUILDING", "FURNITURE", "HOUSEHOLD", "MACHINERY"]


def net_revenue(batch):
    batch["revenue"] = batch["l_extendedprice"] * (1 - batch["l_discount"]) * (1 + batch["l_tax"])
    return batch


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def generate(data: Path, scale: float) -> Path:
    target = data / f"sf{scale:g}"
    if not (target / "lineitem.parquet").exists():
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                str(BIN / "tpchgen-cli"),
                "parquet",
                "-s",
                f"{scale:g}",
                f"--output-dir={target}",
                "--tables=lineitem,orders,customer,nation",
            ],
            check=True,
        )
    return target


def handwritten(source: str, output: str, tuned: bool) -> dict:
    """The same work as one hand-written Ray Data driver (run as one remote task)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray
    import ray.data
    from ray.data.aggregate import Count, CountDistinct, Sum
    from ray.data.context import DataContext, ShuffleStrategy

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    if tuned:
        os.environ["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"] = "1"
        ctx.use_datasource_v2 = False
        ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    ctx.enable_arrow_backed_pandas_conversion = False
    started = time.perf_counter()

    def prepare(t: pa.Table) -> pa.Table:
        t = t.cast(
            pa.schema(
                [
                    f.with_type(pa.string())
                    if pa.types.is_string_view(f.type)
                    else f.with_type(pa.float64())
                    if f.name in MONEY
                    else f
                    for f in t.schema
                ]
            )
        )
        low, high = (pa.scalar(d).cast(pa.date32()) for d in YEAR)
        return t.filter(pc.and_(pc.greater_equal(t["l_shipdate"], low), pc.less(t["l_shipdate"], high)))

    def strings(t: pa.Table) -> pa.Table:
        return t.cast(pa.schema([f.with_type(pa.string()) if pa.types.is_string_view(f.type) else f for f in t.schema]))

    cols = ["l_orderkey", "l_extendedprice", "l_discount", "l_tax", "l_quantity", "l_shipdate", "l_returnflag"]
    lines = ray.data.read_parquet(f"{source}/lineitem.parquet", columns=cols)
    lines = lines.map_batches(prepare, batch_format="pyarrow", batch_size=None).map_batches(net_revenue)
    dims = {
        table: ray.data.read_parquet(f"{source}/{table}.parquet", columns=columns).map_batches(
            strings, batch_format="pyarrow", batch_size=None
        )
        for table, columns in DIMENSIONS.items()
    }
    keys = [
        ("l_orderkey", "o_orderkey", "orders"),
        ("o_custkey", "c_custkey", "customer"),
        ("c_nationkey", "n_nationkey", "nation"),
    ]
    by = ["l_shipdate", "c_mktsegment", "n_name"]
    joined = lines
    if not tuned:  # what a first script looks like: Ray Data's own join and groupby
        for left, right, name in keys:
            joined = joined.join(dims[name], "inner", 4, on=(left,), right_on=(right,))
        result = joined.groupby(by).aggregate(
            Sum("revenue", alias_name="revenue"),
            CountDistinct("l_orderkey", alias_name="orders"),
            Count(alias_name="lines"),
        )
    else:  # the techniques the runtime uses: broadcast joins, two-phase pyarrow aggregation
        from airflow_provider_raydata.runtime.transforms import (
            broadcast_join,
            broadcast_join_batch_rows,
            merge_partials,
            partial_aggregate,
        )

        # Sized as the provider does (about one batch per CPU); one year is about 1/7 of lineitem.
        batch_rows = broadcast_join_batch_rows(pq_rows(f"{source}/lineitem.parquet") // 7)

        for left, right, name in keys:
            table = ray.put(pa.concat_tables(ray.get(dims[name].to_arrow_refs())))
            options = {"right": table, "on": [left], "right_on": [right], "how": "inner", "suffix": None}
            joined = joined.map_batches(
                broadcast_join, batch_format="pyarrow", batch_size=batch_rows, fn_kwargs=options
            )
        aggs = [("revenue", "sum", "revenue"), ("orders", "count_distinct", "l_orderkey"), ("lines", "count", None)]
        partials = joined.map_batches(
            partial_aggregate, batch_format="pyarrow", batch_size=None, fn_kwargs={"by": by, "aggs": aggs}
        )
        result = ray.data.from_arrow(merge_partials(pa.concat_tables(ray.get(partials.to_arrow_refs())), by, aggs))
    result.write_parquet(output)
    rows = sum(pq_rows(f) for f in Path(output).glob("*.parquet"))
    return {"seconds": time.perf_counter() - started, "rows_out": rows}


def pq_rows(path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def run_handwritten(head: RayHead, source: Path, work: Path, tuned: bool) -> dict:
    import ray

    from airflow_provider_raydata.pickling import ship_by_value

    ship_by_value(handwritten)
    started = time.perf_counter()
    ray.init(head.address, log_to_driver=False)
    try:
        inner = ray.get(ray.remote(num_cpus=0)(handwritten).remote(str(source), str(work / f"hand-{tuned}"), tuned))
    finally:
        ray.shutdown()
    return {
        "wall_seconds": time.perf_counter() - started,
        "cluster_seconds": inner["seconds"],
        "rows_out": inner["rows_out"],
    }


def run_operators(source: Path, work: Path) -> dict:
    from airflow_provider_raydata.operators import (
        RayDataExtractOperator,
        RayDataLoadOperator,
        RayDataQualityOperator,
        RayDataTransformOperator,
    )

    stages, run_id = {}, f"bench-{time.time_ns()}"
    staging = str(work / "staging")

    def timed(op):
        started = time.perf_counter()
        result, ti = run_operator(op, run_id=run_id)
        stages[op.task_id] = {
            "wall_seconds": round(time.perf_counter() - started, 2),
            "cluster_seconds": ti.xcoms["metrics"]["seconds"],
            "rows_in": ti.xcoms["metrics"]["rows_in"],
            "rows_out": ti.xcoms["metrics"]["rows_out"],
        }
        return result

    lineitem = timed(
        RayDataExtractOperator(
            task_id="extract_lineitem",
            source=f"{source}/lineitem.parquet",
            staging_uri=staging,
            columns=[
                "l_orderkey",
                "l_extendedprice",
                "l_discount",
                "l_tax",
                "l_quantity",
                "l_shipdate",
                "l_returnflag",
            ],
            filter=f"l_shipdate >= '{YEAR[0]}' and l_shipdate < '{YEAR[1]}'",
            cast=MONEY,
        )
    )
    orders, customer, nation = (
        timed(
            RayDataExtractOperator(
                task_id=f"extract_{table}", source=f"{source}/{table}.parquet", staging_uri=staging, columns=columns
            )
        )
        for table, columns in DIMENSIONS.items()
    )
    revenue = timed(
        RayDataTransformOperator(
            task_id="transform",
            input=lineitem,
            fn=net_revenue,
            staging_uri=staging,
            steps=[
                {"op": "join", "right": orders, "on": ["l_orderkey"], "right_on": ["o_orderkey"]},
                {"op": "join", "right": customer, "on": ["o_custkey"], "right_on": ["c_custkey"]},
                {"op": "join", "right": nation, "on": ["c_nationkey"], "right_on": ["n_nationkey"]},
                {
                    "op": "aggregate",
                    "by": ["l_shipdate", "c_mktsegment", "n_name"],
                    "aggs": {
                        "revenue": ["sum", "revenue"],
                        "orders": ["count_distinct", "l_orderkey"],
                        "lines": ["count"],
                    },
                },
            ],
        )
    )
    checked = timed(
        RayDataQualityOperator(
            task_id="quality",
            input=revenue,
            staging_uri=staging,  # it commits its output and quarantine
            checks=[
                {"check": "row_count", "min": 1},
                {"check": "not_null", "column": "revenue"},
                {"check": "unique", "columns": ["l_shipdate", "c_mktsegment", "n_name"]},
                {"check": "range", "column": "revenue", "min": 0},
                {"check": "accepted_values", "column": "c_mktsegment", "values": SEGMENTS},
            ],
        )
    )
    timed(
        RayDataLoadOperator(
            task_id="load",
            input=checked,
            destination=str(work / "lake"),
            partition_by=["c_mktsegment"],
            mode="overwrite_partitions",
        )
    )
    total = sum(s["wall_seconds"] for s in stages.values())
    return {"wall_seconds": round(total, 2), "stages": stages, "rows_out": stages["transform"]["rows_out"]}


def operators_only(source: str, work: str) -> None:
    result = run_operators(Path(source), Path(work))
    result["airflow_side_peak_rss_mb"] = round(peak_rss_mb(), 1)
    print(json.dumps(result))


def main() -> None:
    if sys.argv[1:2] == ["--operators-only"]:
        return operators_only(sys.argv[2], sys.argv[3])
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=float, nargs="+", default=[1.0, 0.1])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "daily_pipeline.json"))
    parser.add_argument("--transports", nargs="+", default=["ray_client", "service"])
    parser.add_argument("--data", default=str(ROOT / ".bench" / "tpch"))
    args = parser.parse_args()
    head = RayHead(Path(tempfile.mkdtemp(prefix="rayb-")))
    head.start()
    service = {
        "conn_type": "raydata",
        "host": f"http://127.0.0.1:{free_port()}",
        "password": "raydata-benchmark-token",
        "extra": {"dashboard_url": head.dashboard_url},
    }
    conns = {"ray_client": head.connection(), "service": service}
    results = {"cluster": "ray start --head --num-cpus=2 on this machine", "runs": {}}
    try:
        if "service" in args.transports:
            os.environ["AIRFLOW_CONN_RAYDATA_DEFAULT"] = json.dumps(service)
            from airflow_provider_raydata.hooks.ray import RayHook

            RayHook().service()  # starts the service job
        for scale in args.scale:
            source = generate(Path(args.data), scale)
            lineitem_rows = pq_rows(source / "lineitem.parquet")
            run = {"lineitem_rows": lineitem_rows}
            for transport in args.transports:
                # The operators run in a fresh process per scale factor, as an Airflow task would:
                # its peak RSS is the Airflow side's memory for that input size.
                work = Path(tempfile.mkdtemp(prefix=f"bench-sf{scale:g}-{transport}-"))
                child = subprocess.run(
                    [sys.executable, __file__, "--operators-only", str(source), str(work)],
                    capture_output=True,
                    text=True,
                    env={**os.environ, "AIRFLOW_CONN_RAYDATA_DEFAULT": json.dumps(conns[transport])},
                    check=False,
                )
                if child.returncode != 0:
                    raise RuntimeError(child.stderr[-3000:])
                key = "operators" if transport == "ray_client" else f"operators_{transport}"
                run[key] = json.loads(child.stdout.strip().splitlines()[-1])
            for tuned in (False, True):
                key = "handwritten_tuned" if tuned else "handwritten_default"
                run[key] = run_handwritten(head, source, work, tuned)
            for key in [k for k in list(run) if k.startswith("operators")]:
                ops, suffix = run[key]["wall_seconds"], key.removeprefix("operators")
                run[key]["lineitem_rows_per_second"] = round(lineitem_rows / ops)
                for script in ("default", "tuned"):
                    hand = run[f"handwritten_{script}"]["wall_seconds"]
                    run[f"ratio_to_handwritten_{script}{suffix}"] = round(ops / hand, 2)
                assert run["handwritten_tuned"]["rows_out"] == run[key]["rows_out"], f"results differ ({key})"
            results["runs"][f"sf{scale:g}"] = run
            print(json.dumps({f"sf{scale:g}": run}, indent=2), flush=True)
    finally:
        head.stop()
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

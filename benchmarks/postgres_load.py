"""Loading TPC-H SF1 lineitem into PostgreSQL: RayDataLoadOperator against psql's \\copy and
pandas.DataFrame.to_sql, in the same run, on the same server.

    python benchmarks/postgres_load.py [--scale 1] [--repeats 3] [--out benchmarks/results/postgres_load.json]

Starts a PostgreSQL server (initdb; fsync on, autovacuum off so that vacuuming one method's
table does not slow the next method down, max_wal_size 4GB so that checkpoints do not
dominate) and a Ray head (2 CPUs, over ray://). Every method but the last loads all rows into an
empty table:
  psql_copy        psql -c "\\copy lineitem FROM 'lineitem.csv' CSV" (the server's own limit)
  psql_copy_primary_key  the same into a table with the primary key (l_orderkey, l_linenumber)
  to_sql           pandas.DataFrame.to_sql through SQLAlchemy/psycopg (chunks of 100k rows)
  operator_<mode>  RayDataLoadOperator.execute() from a committed Parquet reference, per mode
                   (overwrite into a missing table, append, replace_partition on l_shipdate,
                   upsert on the primary key (l_orderkey, l_linenumber)); then
  operator_upsert_every_key_updated  the same upsert again over the full table
Methods run interleaved, --repeats times (to_sql once); reports the median seconds, rows/s
and the ratio of each method's rows/s to psql's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="raydata-bench-airflow-"))

import pyarrow as pa  # noqa: E402
import pyarrow.csv as pacsv  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from airflow_provider_raydata.contracts import ProducedBy  # noqa: E402
from airflow_provider_raydata.operators import RayDataLoadOperator  # noqa: E402
from airflow_provider_raydata.runtime import refs  # noqa: E402
from airflow_provider_raydata.runtime.postgres.common import pg_type  # noqa: E402
from tests.helpers import run_operator  # noqa: E402
from tests.services import BIN, PostgresServer, RayHead  # noqa: E402

KEY = ["l_orderkey", "l_linenumber"]
SERVER_SETTINGS = {"fsync": "on", "autovacuum": "off", "max_wal_size": "4GB", "shared_buffers": "1GB"}


def prepare(data: Path, scale: float) -> tuple[dict, Path, pa.Schema]:
    """TPC-H lineitem as a committed reference (Parquet) and as CSV for psql."""
    raw = data / f"raw-sf{scale:g}"
    if not (raw / "lineitem.parquet").exists():
        raw.mkdir(parents=True, exist_ok=True)
        cmd = [str(BIN / "tpchgen-cli"), "parquet", "-s", str(scale), "--tables=lineitem", f"--output-dir={raw}"]
        subprocess.run(cmd, check=True, capture_output=True)
    table = pq.read_table(raw / "lineitem.parquet")
    # tpchgen writes string_view, which pandas batches and COPY's CSV writer do not take.
    table = table.cast(
        pa.schema([f.with_type(pa.string()) if pa.types.is_string_view(f.type) else f for f in table.schema])
    )
    attempt = refs.new_attempt_uri(str(data / f"ref-sf{scale:g}"), 1)
    os.makedirs(attempt)
    for index, start in enumerate(range(0, table.num_rows, 1_000_000)):
        pq.write_table(table.slice(start, 1_000_000), f"{attempt}/part-{index}.parquet")
    csv_path = data / f"lineitem-sf{scale:g}.csv"
    pacsv.write_csv(table, csv_path, pacsv.WriteOptions(include_header=False))
    return refs.commit(attempt, None, ProducedBy()).to_dict(), csv_path, table.schema


def create_table(conn, name: str, schema: pa.Schema, primary_key: bool = False) -> None:
    columns = ", ".join(f"{f.name} {pg_type(f)}" for f in schema)
    key = f", PRIMARY KEY ({', '.join(KEY)})" if primary_key else ""
    conn.execute(f"DROP TABLE IF EXISTS {name}")
    conn.execute(f"CREATE TABLE {name} ({columns}{key})")


def count(conn, table: str) -> int:
    return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def checkpoint(conn) -> None:
    conn.execute("CHECKPOINT")  # every method starts from the same WAL state


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=float, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "postgres_load.json"))
    parser.add_argument("--to-sql-rows", type=int, default=None, help="limit to_sql to the first N rows")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each method (the median is reported)")
    args = parser.parse_args()

    import psycopg
    from sqlalchemy import create_engine

    work = Path(tempfile.mkdtemp(prefix="raydata-pgbench-"))
    ref, csv_path, schema = prepare(work, args.scale)
    rows = ref["num_rows"]
    server = PostgresServer(work / "pg", settings=SERVER_SETTINGS)
    head = RayHead(Path(tempfile.mkdtemp(prefix="rayh-")))
    server.start()
    head.start()
    results: dict[str, dict] = {}
    try:
        os.environ["AIRFLOW_CONN_RAYDATA_DEFAULT"] = json.dumps(head.connection())
        os.environ["AIRFLOW_CONN_PG_BENCH"] = json.dumps(server.connection())
        conn = psycopg.connect(**server.params, autocommit=True)

        def record(name: str, seconds: float, loaded: int, **extra) -> None:
            assert loaded == (args.to_sql_rows or rows if name == "to_sql" else rows), (name, loaded)
            entry = results.setdefault(name, {"runs": []})
            entry["runs"].append({"seconds": round(seconds, 2), **extra})
            print(f"{name:28s} {seconds:8.2f} s  {loaded / seconds:>10,.0f} rows/s  {extra or ''}", flush=True)

        env = {**os.environ, "PGPASSWORD": server.password}

        def psql_copy(name: str = "psql_copy", primary_key: bool = False) -> None:
            create_table(conn, "lineitem_psql", schema, primary_key=primary_key)
            checkpoint(conn)
            started = time.perf_counter()
            command = f"\\copy lineitem_psql FROM '{csv_path}' CSV"
            subprocess.run(
                [
                    "psql",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(server.port),
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                    "-q",
                    "-c",
                    command,
                ],
                check=True,
                env=env,
            )
            record(name, time.perf_counter() - started, count(conn, "lineitem_psql"))

        # A warm-up load: the first stage on a new cluster starts its stage executor (once per cluster).
        warm = RayDataLoadOperator(
            task_id="warmup", input=ref, destination={"kind": "parquet", "path": str(work / "w")}
        )
        run_operator(warm)

        def operator(mode: str, table: str, repeat: int, name: str | None = None, **kwargs) -> None:
            op = RayDataLoadOperator(
                task_id=f"load_{mode}",
                input=ref,
                destination={"kind": "postgres", "postgres_conn_id": "pg_bench", "table": table},
                mode=mode,
                **kwargs,
            )
            checkpoint(conn)
            started = time.perf_counter()
            name = name or f"operator_{mode}"
            result, ti = run_operator(op, run_id=f"{name}_{repeat}")  # a new run: append is not skipped
            seconds = time.perf_counter() - started
            cluster = ti.xcoms["metrics"]["seconds"]  # the stage on the cluster: COPYs and publish
            record(
                name,
                seconds,
                count(conn, table),
                stage_on_cluster_s=cluster,
                copy_s=result["copy_seconds"],
                index_s=result["index_seconds"],
                publish_s=result["publish_seconds"],
            )

        for repeat in range(args.repeats):  # interleaved, so that a slow spell hits every method
            psql_copy()
            conn.execute("DROP TABLE IF EXISTS lineitem_overwrite")
            operator("overwrite", "lineitem_overwrite", repeat)
            create_table(conn, "lineitem_append", schema)
            operator("append", "lineitem_append", repeat)
            create_table(conn, "lineitem_partitions", schema)
            operator("replace_partition", "lineitem_partitions", repeat, partition_by=["l_shipdate"])
            create_table(conn, "lineitem_upsert", schema, primary_key=True)
            operator("upsert", "lineitem_upsert", repeat, keys=KEY)
            # The same rows again: every key is already there and is updated (ON CONFLICT DO UPDATE).
            operator("upsert", "lineitem_upsert", repeat, name="operator_upsert_every_key_updated", keys=KEY)
            psql_copy("psql_copy_primary_key", primary_key=True)  # what the upsert's index costs \copy

        lineitem = pq.read_table(ref["uri"])  # decimals as floats: what a pandas user's frame holds
        lineitem = lineitem.cast(
            pa.schema([f.with_type(pa.float64()) if pa.types.is_decimal(f.type) else f for f in lineitem.schema])
        )
        frame = lineitem.to_pandas()
        if args.to_sql_rows:
            frame = frame.head(args.to_sql_rows)
        engine = create_engine(f"postgresql+psycopg://postgres:{server.password}@127.0.0.1:{server.port}/postgres")
        create_table(conn, "lineitem_pandas", schema)
        checkpoint(conn)
        started = time.perf_counter()
        frame.to_sql("lineitem_pandas", engine, if_exists="append", index=False, chunksize=100_000)
        record("to_sql", time.perf_counter() - started, count(conn, "lineitem_pandas"))
        conn.close()
    finally:
        head.stop()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)  # ~8 GB at SF1: data, CSV, the server's files
        shutil.rmtree(head.temp_dir, ignore_errors=True)

    for name, entry in results.items():
        loaded = args.to_sql_rows or rows if name == "to_sql" else rows
        times = sorted(run["seconds"] for run in entry["runs"])
        entry.update(seconds=statistics.median(times), best_seconds=times[0], rows=loaded)
        entry["rows_per_s"] = round(loaded / entry["seconds"])
    psql_rate = results["psql_copy"]["rows_per_s"]
    for entry in results.values():
        entry["ratio_to_psql_copy"] = round(entry["rows_per_s"] / psql_rate, 2)
    summary = {
        "scale": args.scale,
        "repeats": args.repeats,
        "rows": rows,
        "cpus": os.cpu_count(),
        "postgres": SERVER_SETTINGS,
        "goals": {
            "operator_overwrite": 1.0,
            "operator_append": 0.8,
            "operator_replace_partition": 0.8,
            "operator_upsert": 0.8,
        },
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2, default=int) + "\n")
    print(json.dumps({k: v["ratio_to_psql_copy"] for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()

"""Incremental cost against history: the incremental pipeline's run for one new day, after 1 day
and after 30 days of history, on the same cluster and server in one run.

    python benchmarks/incremental.py [--orders-per-day 20000] [--history-days 1 30] [--repeats 3]
                                     [--out benchmarks/results/incremental.json]

Starts a PostgreSQL server (initdb; fsync on, shared_buffers 1GB) and a Ray head (2 CPUs, over
ray://). For each history size N it builds, without the pipeline, what N daily runs of
dags/raydata_incremental.py would have left (from scripts/incremental_data.py's generator and
its ``expected_state``): ``public.orders_src`` with its ``updated_at`` index, N date partitions of
payment events in the landing folder, the upsert targets ``public.orders``/``public.payments``
(primary key on the id, the loads' ledger) and the lake partitioned by creation date, one file
per partition. The history is a template database and template folders; before every timed run
the state is reset from them (CREATE DATABASE ... TEMPLATE, a copy of the lake), then the next
day's changes are applied (new orders, updates and soft deletes of orders spread over the whole
history, payment events) and the day's six operator calls run one after the other, as
RayDataExtractOperator/RayDataLoadOperator.execute() through RayHook, with the arguments of the
DAG: extract_orders (PostgreSQL, window on updated_at), extract_payments (only the window's
partition), and for each entity an upsert into PostgreSQL and one into the lake.

Reports per operator the wall seconds and the stage's seconds on the cluster (the ``metrics``
XCom), best and median of --repeats; the rows each extract read against the history's size (and
PostgreSQL's own scan counters for orders_src); what the lake upserts rewrote; the ratio of the
largest history's total to the smallest's. After the first timed run of each history size the
targets are compared with ``expected_state`` row by row.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="raydata-bench-airflow-"))

import incremental_data  # noqa: E402
import psycopg  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.csv as pacsv  # noqa: E402
import pyarrow.dataset as pads  # noqa: E402
import pyarrow.fs as pafs  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from airflow_provider_raydata.contracts import IncrementalWindow  # noqa: E402
from airflow_provider_raydata.operators import RayDataExtractOperator, RayDataLoadOperator  # noqa: E402
from airflow_provider_raydata.runtime.postgres.common import LEDGER, pg_type  # noqa: E402
from airflow_provider_raydata.runtime.sources import in_window_partitions  # noqa: E402
from airflow_provider_raydata.runtime.storage import expand  # noqa: E402
from tests.helpers import FakeTaskInstance, run_operator  # noqa: E402
from tests.services import PostgresServer, RayHead  # noqa: E402

CONN_ID = "raydata_warehouse"  # the DAG's default connection: source and warehouse
DATABASE = "warehouse"  # recreated from a history's template database before every run
POSTGRES_SETTINGS = {"fsync": "on", "max_wal_size": "4GB", "shared_buffers": "1GB"}
DAG_ID = FakeTaskInstance().dag_id  # run_operator's task instances carry this dag_id
# entity -> (key, lake partition column, Arrow schema), as the DAG's extracts produce them:
# orders with the types PostgreSQL describes for orders_src, payments as the landing files hold them.
ORDERS_SCHEMA = pa.schema(
    [
        ("order_id", pa.int64()),
        ("customer_id", pa.int32()),
        ("status", pa.string()),
        ("amount", pa.decimal128(12, 2)),
        ("order_date", pa.date32()),
        ("updated_at", pa.timestamp("us", tz="UTC")),
        ("is_deleted", pa.bool_()),
    ]
)
ENTITIES: dict[str, tuple[str, str, pa.Schema]] = {
    "orders": ("order_id", "order_date", ORDERS_SCHEMA),
    "payments": ("payment_id", "paid_date", incremental_data.PAYMENT_SCHEMA),
}
STEPS = [
    "extract_orders",
    "extract_payments",
    "upsert_orders_warehouse",
    "upsert_orders_lake",
    "upsert_payments_warehouse",
    "upsert_payments_lake",
]
LAKE_STEPS = ["upsert_orders_lake", "upsert_payments_lake"]


@dataclass
class History:
    """N days of history, built directly: a template database and template folders."""

    days: int
    template: str  # database name
    landing: Path  # payment files; the new day's partition is added by ``apply_new_day``
    lake: Path  # the lake as N daily runs left it; copied before every run
    facts: dict[str, Any] = field(default_factory=dict)


def interval(day: date) -> tuple[datetime, datetime]:
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return start, start + timedelta(days=1)


def run_id_for(day: date) -> str:
    """The run id a scheduled run for ``day``'s data interval has."""
    return f"scheduled__{interval(day)[0].isoformat()}"


def load_id(task_id: str, day: date) -> str:
    return RayDataLoadOperator.load_id(SimpleNamespace(dag_id=DAG_ID, run_id=run_id_for(day), task_id=task_id))


def as_table(rows: list[dict], schema: pa.Schema, key: str) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema).sort_by(key)


def copy_rows(conn: psycopg.Connection, table: str, rows: pa.Table) -> None:
    """COPY an Arrow table into ``table`` as CSV, the way the load stage's COPY encodes it."""
    buffer = io.BytesIO()
    pacsv.write_csv(rows, buffer, pacsv.WriteOptions(include_header=False))
    with conn.cursor() as cur, cur.copy(f"COPY {table} ({', '.join(rows.column_names)}) FROM STDIN (FORMAT csv)") as cp:
        cp.write(buffer.getvalue())


def create_target(conn: psycopg.Connection, entity: str) -> None:
    """The table the first upsert creates: the load's columns, a primary key on the upsert key."""
    key, _, schema = ENTITIES[entity]
    columns = ", ".join(f"{f.name} {pg_type(f)}" for f in schema)
    conn.execute(f"CREATE TABLE public.{entity} ({columns}, PRIMARY KEY ({key}))")


def write_lake_partitions(root: Path, rows: pa.Table, partition: str, basename: str) -> None:
    """One file per partition, rows in key order: what a lake upsert's rewrite leaves."""
    pads.write_dataset(
        rows,
        root,
        format="parquet",
        partitioning=[partition],
        partitioning_flavor="hive",
        basename_template=f"{basename}-{{i}}.parquet",
        existing_data_behavior="overwrite_or_ignore",
    )


def build_history(server: PostgresServer, work: Path, days: list[incremental_data.Day]) -> History:
    """What len(days) daily runs would have left, written directly (COPY, pyarrow)."""
    started = time.perf_counter()
    n = len(days)
    history = History(n, f"history_{n}", work / f"history-{n}" / "landing", work / f"history-{n}" / "lake")
    orders, payments = incremental_data.expected_state(days)
    state = {
        "orders": as_table(list(orders.values()), ORDERS_SCHEMA, "order_id"),
        "payments": as_table(list(payments.values()), incremental_data.PAYMENT_SCHEMA, "payment_id"),
    }
    with psycopg.connect(**server.params, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {history.template}")
    with psycopg.connect(**{**server.params, "dbname": history.template}, autocommit=True) as conn:
        conn.execute(incremental_data.ORDERS_DDL)  # orders_src with its updated_at index
        copy_rows(conn, "public.orders_src", state["orders"])  # the source holds every order's current row
        for entity, rows in state.items():
            create_target(conn, entity)
            copy_rows(conn, f"public.{entity}", rows)
        # The publish transaction's ledger, one row per (target, daily load), as N runs leave it.
        conn.execute(
            f"CREATE TABLE public.{LEDGER} (target text, load_id text, mode text, rows bigint,"
            " loaded_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (target, load_id))"
        )
        ledger = [
            (f"public.{entity}", load_id(f"upsert_{entity}_warehouse", day.day), "upsert", len(getattr(day, entity)))
            for day in days
            for entity in ENTITIES
        ]
        with conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO public.{LEDGER} (target, load_id, mode, rows) VALUES (%s, %s, %s, %s)", ledger
            )
        conn.execute("VACUUM ANALYZE")  # as autovacuum would have left N days of tables
        relation_bytes = conn.execute(
            "SELECT relname, pg_total_relation_size(oid) FROM pg_class "
            "WHERE relname IN ('orders_src', 'orders', 'payments')"
        ).fetchall()
    with psycopg.connect(**server.params, autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE {history.template} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false")
    for day in days:
        incremental_data.write_payments(history.landing, day)
    for entity, rows in state.items():
        _, partition, _ = ENTITIES[entity]
        write_lake_partitions(
            history.lake / entity, rows, partition, f"{load_id(f'upsert_{entity}_lake', days[-1].day)}-0"
        )
    history.facts = {
        "days": n,
        "orders_src_rows": state["orders"].num_rows,
        "warehouse_rows": {entity: rows.num_rows for entity, rows in state.items()},
        "postgres_bytes": dict(sorted(relation_bytes)),
        "landing_files": len(list(history.landing.rglob("*.parquet"))),
        "landing_rows": sum(pq.ParquetFile(p).metadata.num_rows for p in history.landing.rglob("*.parquet")),
        "lake_partitions": {entity: len(list((history.lake / entity).iterdir())) for entity in ENTITIES},
        "lake_rows": {entity: rows.num_rows for entity, rows in state.items()},
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    return history


def apply_new_day(conn: psycopg.Connection, history: History, day: incremental_data.Day) -> None:
    """The day's changes to the sources: order rows upserted into orders_src (new orders,
    updates, soft deletes; the same rows incremental_data.apply_orders writes, through COPY),
    and the day's payment events as a new partition of the landing folder."""
    changes = as_table(day.orders, ORDERS_SCHEMA, "order_id")
    columns = ", ".join(changes.column_names)
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in changes.column_names[1:])
    conn.execute("CREATE TEMP TABLE changes (LIKE public.orders_src)")
    copy_rows(conn, "changes", changes)
    conn.execute(
        f"INSERT INTO public.orders_src ({columns}) SELECT {columns} FROM changes "
        f"ON CONFLICT (order_id) DO UPDATE SET {updates}"
    )
    conn.execute("DROP TABLE changes")
    conn.execute("ANALYZE public.orders_src")  # autovacuum's analyze would follow such a change
    incremental_data.write_payments(history.landing, day)


def reset(server: PostgresServer, history: History, day: incremental_data.Day, lake: Path, staging: Path) -> None:
    """The state N daily runs left, plus the new day's source changes; nothing of earlier runs."""
    with psycopg.connect(**server.params, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {DATABASE} TEMPLATE {history.template}")
    with psycopg.connect(**{**server.params, "dbname": DATABASE}, autocommit=True) as conn:
        apply_new_day(conn, history, day)
    for folder in (lake, staging):
        shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(history.lake, lake)
    staging.mkdir(parents=True)
    with psycopg.connect(**server.params, autocommit=True) as admin:
        admin.execute("CHECKPOINT")  # every run starts from the same WAL state
    time.sleep(1)  # the closed sessions' statistics are flushed before the run's are counted


def scan_counters(params: dict) -> dict[str, int]:
    """PostgreSQL's cumulative scan counters for orders_src (sequential and index scans)."""
    with psycopg.connect(**{**params, "dbname": DATABASE}, autocommit=True) as conn:
        row = conn.execute(
            "SELECT seq_scan, seq_tup_read, coalesce(idx_scan, 0), coalesce(idx_tup_fetch, 0) "
            "FROM pg_stat_user_tables WHERE relid = 'public.orders_src'::regclass"
        ).fetchone()
    return dict(zip(("seq_scan", "seq_tup_read", "idx_scan", "idx_tup_fetch"), row, strict=True))


def run_day(day: date, landing: Path, lake: Path) -> dict[str, dict]:
    """The incremental DAG's six operator calls for ``day``'s data interval, one after the other."""
    start, end = interval(day)
    context = {"data_interval_start": start, "data_interval_end": end}
    steps: dict[str, dict] = {}

    def timed(op: RayDataExtractOperator | RayDataLoadOperator) -> dict:
        started = time.perf_counter()
        result, ti = run_operator(op, run_id=run_id_for(day), **context)
        metrics = ti.xcoms["metrics"]
        steps[op.task_id] = {
            "wall_seconds": round(time.perf_counter() - started, 3),
            "cluster_seconds": metrics["seconds"],
            # int(): a PostgreSQL load's rows_out arrives as numpy.int64 (Ray Data's write returns)
            "rows_in": None if metrics["rows_in"] is None else int(metrics["rows_in"]),
            "rows_out": None if metrics["rows_out"] is None else int(metrics["rows_out"]),
        }
        return result

    warehouse = {"postgres_conn_id": CONN_ID}
    refs = {
        "orders": timed(
            RayDataExtractOperator(
                task_id="extract_orders",
                source={"kind": "postgres", **warehouse, "table": "public.orders_src", "shard_key": "order_id"},
                incremental={
                    "column": "updated_at",
                    "mode": "interval",
                    "watermark": {**warehouse, "table": "public.orders"},
                },
            )
        ),
        "payments": timed(
            RayDataExtractOperator(
                task_id="extract_payments",
                source=str(landing),
                format="parquet",
                columns=incremental_data.PAYMENT_SCHEMA.names,
                incremental={
                    "column": "updated_date",
                    "partitioned": True,
                    "mode": "interval",
                    "watermark": {**warehouse, "table": "public.payments", "column": "updated_at"},
                },
            )
        ),
    }
    for entity, ref in refs.items():
        steps[f"extract_{entity}"].update(files_out=ref["num_files"], schema=ref["schema"])
    for entity, (key, partition, _) in ENTITIES.items():
        load = timed(
            RayDataLoadOperator(
                task_id=f"upsert_{entity}_warehouse",
                input=refs[entity],
                destination={
                    "kind": "postgres",
                    **warehouse,
                    "table": f"public.{entity}",
                    "sequence_by": "updated_at",
                },
                mode="upsert",
                keys=[key],
            )
        )
        steps[f"upsert_{entity}_warehouse"].update(
            copy_seconds=load["copy_seconds"], publish_seconds=load["publish_seconds"]
        )
        load = timed(
            RayDataLoadOperator(
                task_id=f"upsert_{entity}_lake",
                input=refs[entity],
                destination={"kind": "parquet", "path": str(lake / entity), "sequence_by": "updated_at"},
                mode="upsert",
                keys=[key],
                partition_by=[partition],
            )
        )
        steps[f"upsert_{entity}_lake"].update(
            partitions_rewritten=len(load["partitions"]),
            rows_rewritten=load["rows_in_partitions"],
            files_written=load["files_written"],
        )
    return steps


def verify(params: dict, lake: Path, days: list[incremental_data.Day]) -> None:
    """The targets hold exactly the latest version of every row after these days."""
    expected = dict(zip(ENTITIES, incremental_data.expected_state(days), strict=True))
    with psycopg.connect(**{**params, "dbname": DATABASE}) as conn:
        for entity, (key, partition, _) in ENTITIES.items():
            cur = conn.execute(f"SELECT * FROM public.{entity}")
            names = [c.name for c in cur.description]
            warehouse = {row[names.index(key)]: dict(zip(names, row, strict=True)) for row in cur.fetchall()}
            partitioning = pads.partitioning(pa.schema([(partition, pa.date32())]), flavor="hive")
            rows = pads.dataset(lake / entity, format="parquet", partitioning=partitioning).to_table().to_pylist()
            in_lake = {row[key]: row for row in rows}
            assert len(in_lake) == len(rows), f"duplicate keys in the {entity} lake"
            assert warehouse == expected[entity], f"warehouse {entity} differs from expected_state"
            assert in_lake == expected[entity], f"lake {entity} differs from expected_state"


def check_schemas(steps: dict[str, dict]) -> None:
    """The history's lake files must have the types the extracts produce (else the direct build
    would not be what daily runs leave)."""
    for entity, (_, _, schema) in ENTITIES.items():
        produced = steps[f"extract_{entity}"]["schema"]
        built = {f.name: str(f.type) for f in schema}
        assert produced == built, f"{entity}: the extract produced {produced}, the history has {built}"


def fastest(action: Callable[[], object], times: int = 5) -> float:
    """The best of ``times`` timings of ``action``, in seconds."""
    timings = []
    for _ in range(times):
        started = time.perf_counter()
        action()
        timings.append(time.perf_counter() - started)
    return round(min(timings), 4)


def listing_costs(history: History) -> dict[str, float]:
    """What the stages list regardless of the window, timed here (local disk, best of 5): the
    payments extract lists the whole landing folder before choosing the window's partitions;
    the lake upsert discovers every file of the lake before filtering the touched partitions."""
    fs = pafs.LocalFileSystem()
    result = {"landing_listing_seconds": fastest(lambda: expand(fs, str(history.landing), (".parquet",)))}
    for entity, (_, partition, schema) in ENTITIES.items():
        partitioning = pads.partitioning(pa.schema([schema.field(partition)]), flavor="hive")
        discover = partial(lake_files, str(history.lake / entity), partitioning)
        result[f"lake_{entity}_discovery_seconds"] = fastest(discover)
    return result


def lake_files(root: str, partitioning: pads.Partitioning) -> int:
    """The lake upsert's discovery: every file of the lake (pyarrow.dataset lists them all)."""
    return len(list(pads.dataset(root, format="parquet", partitioning=partitioning).get_fragments()))


def files_read(history: History, day: date) -> dict[str, int]:
    """The landing files (and rows) the payments extract reads for ``day``: its window's partitions."""
    start, end = interval(day)
    window = IncrementalWindow("updated_date", start.isoformat(), end.isoformat(), partitioned=True)
    every = expand(pafs.LocalFileSystem(), str(history.landing), (".parquet",))
    chosen = in_window_partitions(every, window)
    return {
        "landing_files": len(every),
        "files_read": len(chosen),
        "rows_in_files_read": sum(pq.ParquetFile(p).metadata.num_rows for p in chosen),
    }


def stats(values: list[float]) -> dict[str, Any]:
    return {"best": round(min(values), 2), "median": round(statistics.median(values), 2), "runs": values}


def summarise(runs: list[dict[str, dict]]) -> dict[str, Any]:
    """Best and median per step (wall and on the cluster) and of the total over the repeats."""
    per_step = {}
    for step in STEPS:
        entries = [run[step] for run in runs]
        per_step[step] = {
            "wall_seconds": stats([e["wall_seconds"] for e in entries]),
            "cluster_seconds": stats([e["cluster_seconds"] for e in entries]),
            # rows, files, partitions, COPY and publish seconds, scan counters: of the first timed run
            "first_run": {
                k: v for k, v in entries[0].items() if k not in ("wall_seconds", "cluster_seconds", "schema")
            },
        }
    totals = [round(sum(run[s]["wall_seconds"] for s in STEPS), 2) for run in runs]
    rest = [round(sum(run[s]["wall_seconds"] for s in STEPS if s not in LAKE_STEPS), 2) for run in runs]
    cluster = [round(sum(run[s]["cluster_seconds"] for s in STEPS), 2) for run in runs]
    return {
        "total_seconds": stats(totals),
        "total_without_lake_upserts_seconds": stats(rest),
        "total_cluster_seconds": stats(cluster),
        "steps": per_step,
    }


def ratios(small: dict[str, Any], large: dict[str, Any]) -> dict[str, Any]:
    def ratio(a: dict, b: dict, which: str) -> float:
        return round(b[which] / a[which], 2)

    result = {}
    for name in ("total_seconds", "total_without_lake_upserts_seconds", "total_cluster_seconds"):
        result[name] = {w: ratio(small[name], large[name], w) for w in ("best", "median")}
    result["steps_wall_median"] = {
        step: ratio(small["steps"][step]["wall_seconds"], large["steps"][step]["wall_seconds"], "median")
        for step in STEPS
    }
    result["steps_cluster_median"] = {
        step: ratio(small["steps"][step]["cluster_seconds"], large["steps"][step]["cluster_seconds"], "median")
        for step in STEPS
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--orders-per-day", type=int, default=20_000, help="new orders per day (history and new day)")
    parser.add_argument("--history-days", type=int, nargs="+", default=[1, 30])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "incremental.json"))
    args = parser.parse_args()
    sizes = sorted(set(args.history_days))

    # One generator run: its first N days are the N-day history (each day depends only on the
    # days before it), and day N+1 is the day the timed run processes.
    started = time.perf_counter()
    days = incremental_data.generate(max(sizes) + 1, args.orders_per_day)
    print(f"generated {len(days)} days in {time.perf_counter() - started:.1f} s", flush=True)

    work = Path(tempfile.mkdtemp(prefix="raydata-incbench-"))
    lake, staging = work / "run" / "lake", work / "run" / "staging"
    server = PostgresServer(work / "pg", settings=POSTGRES_SETTINGS)
    head = RayHead(Path(tempfile.mkdtemp(prefix="rayi-")))  # short: socket paths are length-limited
    server.start()
    runs: dict[int, list[dict]] = {n: [] for n in sizes}
    reads: dict[int, dict] = {}
    try:
        histories = {}
        for n in sizes:
            histories[n] = build_history(server, work, days[:n])
            print(f"history of {n} days: {json.dumps(histories[n].facts)}", flush=True)
        head.start()
        os.environ["AIRFLOW_CONN_RAYDATA_DEFAULT"] = json.dumps(head.connection(staging_uri=str(staging)))
        os.environ[f"AIRFLOW_CONN_{CONN_ID.upper()}"] = json.dumps({**server.connection(), "schema": DATABASE})

        def timed_run(n: int) -> dict[str, dict]:
            history, new_day = histories[n], days[n]
            reset(server, history, new_day, lake, staging)
            before = scan_counters(server.params)
            steps = run_day(new_day.day, history.landing, lake)
            after = scan_counters(server.params)
            steps["extract_orders"]["orders_src_scans"] = {k: after[k] - before[k] for k in before}
            return steps

        # Untimed: the first stage starts the cluster's stage executor and the Ray Client session.
        timed_run(sizes[0])
        for repeat in range(args.repeats):  # interleaved, so that noise hits every history size alike
            for n in sizes:
                steps = timed_run(n)
                if repeat == 0:
                    check_schemas(steps)
                    verify(server.params, lake, days[: n + 1])
                    reads[n] = files_read(histories[n], days[n].day) | listing_costs(histories[n])
                runs[n].append(steps)
                total = sum(steps[s]["wall_seconds"] for s in STEPS)
                walls = " ".join(f"{s}={steps[s]['wall_seconds']:.1f}" for s in STEPS)
                print(f"repeat {repeat} history {n:>3} days: total {total:6.1f} s  {walls}", flush=True)
    finally:
        from airflow_provider_raydata.hooks.ray import drop_client_session

        drop_client_session()
        head.stop()
        server.stop()
        shutil.rmtree(head.temp_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)

    results = {}
    for n in sizes:
        summary = summarise(runs[n])
        extract = summary["steps"]["extract_orders"]["first_run"]
        summary["reads"] = {
            "orders_src_rows": histories[n].facts["orders_src_rows"]
            + sum(1 for row in days[n].orders if row["order_date"] == days[n].day),
            "orders_rows_extracted": extract["rows_out"],
            "orders_src_scans_first_run": runs[n][0]["extract_orders"]["orders_src_scans"],
            "payment_events_extracted": summary["steps"]["extract_payments"]["first_run"]["rows_out"],
            **reads[n],
        }
        results[str(n)] = {"history": histories[n].facts, **summary}
    small, large = results[str(sizes[0])], results[str(sizes[-1])]
    new_day = days[sizes[0]]
    output = {
        "cluster": "ray start --head --num-cpus=2 here, over ray://; the operators' execute() through RayHook",
        "postgres": POSTGRES_SETTINGS,
        "cpus": os.cpu_count(),
        "orders_per_day": args.orders_per_day,
        "history_days": sizes,
        "repeats": args.repeats,
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "new_day": {
            "order_changes": len(new_day.orders),
            "new_orders": sum(1 for row in new_day.orders if row["order_date"] == new_day.day),
            "payment_events": len(new_day.payments),
            "order_partitions_touched": {str(n): len({r["order_date"] for r in days[n].orders}) for n in sizes},
            "payment_partitions_touched": {str(n): len({r["paid_date"] for r in days[n].payments}) for n in sizes},
        },
        "ratio_largest_to_smallest_history": ratios(small, large),
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(output, indent=2, default=str) + "\n")
    print(json.dumps(output["ratio_largest_to_smallest_history"], indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

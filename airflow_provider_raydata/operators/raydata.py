"""The four Ray Data operators. They render templates, build a plain stage spec, hand it to
RayHook and push the small result to XCom; the rows never pass through the Airflow worker."""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any

from airflow.sdk import BaseOperator, BaseOperatorLink
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from airflow.utils.state import TaskInstanceState

from airflow_provider_raydata.hooks.ray import RayHook
from airflow_provider_raydata.hooks.warehouses import (
    aws_storage_options,
    gcs_storage_options,
    load_bigquery,
    postgres_watermark,
    publish_load,
    resolve_connection,
    sweep_postgres,
)
from airflow_provider_raydata.runtime.refs import task_prefix
from airflow_provider_raydata.runtime.specs import validate_checks, validate_destination, validate_steps

DatasetRefLike = dict[str, Any] | str
log = logging.getLogger(__name__)
DASHBOARD_XCOM_KEY = "ray_dashboard_url"


class RayDashboardLink(BaseOperatorLink):
    """'Ray Dashboard' button on a task: the dashboard of the cluster that ran it."""

    name = "Ray Dashboard"

    def get_link(self, operator: BaseOperator, *, ti_key) -> str:
        from airflow.sdk.execution_time.xcom import XCom

        return XCom.get_value(ti_key=ti_key, key=DASHBOARD_XCOM_KEY) or ""


class RayDataBaseOperator(BaseOperator):
    """Shared plumbing: connection, staging location, spec building and the remote call.

    :param raydata_conn_id: a ``raydata`` connection; without a ``raydata_default`` connection
        the stage runs on an embedded local Ray.
    :param staging_uri: where stage outputs are committed (templated). Defaults to the
        connection's ``staging_uri``, then (embedded Ray only) ``$AIRFLOW_HOME/raydata/staging``.
    :param aws_conn_id: an Airflow ``aws`` connection for s3:// paths (credentials, region and
        ``endpoint_url`` for S3-compatible stores such as MinIO).
    :param gcp_conn_id: a ``google_cloud_platform`` connection for gs:// paths.
    :param storage_options: explicit S3 settings (``endpoint_url``, ``region_name``, ...), merged
        over the raydata connection's ``storage_options`` and the aws/gcp connections.
    :param tuning: overrides of the runtime's Ray Data settings (see ``runtime.runner``).
    :param stage_timeout: seconds before the remote stage is cancelled and the task fails.
    """

    stage: str = ""
    writes_output = False
    template_fields: Sequence[str] = ("staging_uri", "storage_options")
    operator_extra_links = (RayDashboardLink(),)
    ui_color = "#d6eaff"

    def __init__(
        self,
        *,
        raydata_conn_id: str | None = RayHook.default_conn_name,
        staging_uri: str | None = None,
        storage_options: dict[str, Any] | None = None,
        aws_conn_id: str | None = None,
        gcp_conn_id: str | None = None,
        tuning: dict[str, Any] | None = None,
        connect_timeout: float | None = None,
        stage_timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.raydata_conn_id = raydata_conn_id
        self.staging_uri = staging_uri
        self.storage_options = storage_options
        self.aws_conn_id = aws_conn_id
        self.gcp_conn_id = gcp_conn_id
        self.tuning = tuning
        self.connect_timeout = connect_timeout
        self.stage_timeout = stage_timeout

    @cached_property
    def hook(self) -> RayHook:
        return RayHook(raydata_conn_id=self.raydata_conn_id, connect_timeout=self.connect_timeout)

    def stage_spec(self, context) -> dict[str, Any]:
        raise NotImplementedError

    def execute(self, context) -> Any:
        ti = context["ti"]
        identity = {
            "dag_id": ti.dag_id,
            "run_id": ti.run_id,
            "task_id": ti.task_id,
            "try_number": ti.try_number,
        }
        spec: dict[str, Any] = {
            "stage": self.stage,
            "name": f"{ti.dag_id}.{ti.task_id}",
            **self.stage_spec(context),
            "storage": self.storage(),
            "tuning": self.tuning,
            "produced_by": identity,
        }
        if self.writes_output:
            spec["output_uri"] = task_prefix(self.resolve_staging_uri(), ti.dag_id, ti.run_id, ti.task_id)
            spec["try_number"] = ti.try_number
        ti.xcom_push(key=DASHBOARD_XCOM_KEY, value=self.hook.settings.dashboard_url or "")
        self.log.info("Running %s stage on %s", self.stage, self.hook.settings.where)
        result = self.hook.run_stage(spec, timeout=self.stage_timeout)
        try:
            return self._finish_stage(context, result)
        except BaseException:
            try:
                self.hook.commit_stage(commit=False)  # a load held open on the cluster: roll it back now
            except Exception as exc:  # its own wait on the cluster rolls it back anyway
                self.log.warning("Could not roll back the load's transaction now: %s", exc)
            raise

    def _finish_stage(self, context, result: dict[str, Any]) -> Any:
        ti = context["ti"]
        metrics = result["metrics"]
        self.log.info(
            "%s stage: rows in %s, rows out %s, %.2fs on the cluster",
            self.stage,
            "-" if metrics["rows_in"] is None else metrics["rows_in"],
            metrics["rows_out"],
            metrics["seconds"],
        )
        ti.xcom_push(key="metrics", value=metrics)
        return self.handle_result(context, result)

    def handle_result(self, context, result: dict[str, Any]) -> Any:
        if "ref" in result:
            self.log.info("Committed %s", result["ref"]["uri"])
        return result.get("ref")

    def storage(self) -> dict[str, Any]:
        """Object-store settings for the stage: raydata connection < aws/gcp connections < explicit."""
        options = dict(self.hook.settings.storage_options)
        if self.aws_conn_id:
            options.update(aws_storage_options(self.aws_conn_id))
        if self.gcp_conn_id:
            options.update(gcs_storage_options(self.gcp_conn_id))
        return {**options, **(self.storage_options or {})}

    def on_kill(self) -> None:
        self.hook.cancel()

    def resolve_staging_uri(self) -> str:
        uri = self.staging_uri or self.hook.settings.staging_uri
        if uri:
            return uri
        if not self.hook.settings.embedded:
            raise AirflowException(
                f"{self.task_id}: the Ray cluster at {self.hook.settings.address} needs a shared staging "
                "URI such as s3://bucket/raydata-staging: set staging_uri on the operator or on the "
                f"{self.raydata_conn_id!r} connection (a local default only works for an embedded Ray)"
            )
        airflow_home = os.environ.get("AIRFLOW_HOME", os.path.expanduser("~/airflow"))
        return os.path.join(airflow_home, "raydata", "staging")

    @staticmethod
    def resolve_input(value: DatasetRefLike | None, name: str = "input") -> DatasetRefLike:
        """A reference dict (from XCom), a JSON string of one (from a template), or a URI."""
        if value is None or value == "":
            raise AirflowException(f"No {name} dataset reference was given (or the upstream pushed none)")
        if isinstance(value, str) and value.lstrip().startswith("{"):
            return json.loads(value)
        return value


class RayDataExtractOperator(RayDataBaseOperator):
    """Read a source into a committed Parquet dataset on the cluster; return its reference.

    :param source: a path, glob or list of them (local, s3:// or gs://), or a source spec dict
        (templated): ``{"kind": "files", "path": ..., "format": "csv"}``, or
        ``{"kind": "postgres", "postgres_conn_id": ..., "query": "... WHERE day = %(day)s",
        "parameters": {"day": "{{ ds }}"}, "shard_key": "id"}`` (or ``"table": "schema.name"``).
        ``{"kind": "snowflake", "snowflake_conn_id": ..., "query": "... WHERE day = ?",
        "parameters": ["{{ ds }}"]}`` (or ``"table": "db.schema.table"``), ``{"kind": "bigquery",
        "gcp_conn_id": ..., "table": "project.dataset.table"}`` (or ``"query"`` with ``@name``
        ``"parameters"``). Query values are always bound parameters, never formatted into the SQL.
    :param format: ``parquet``, ``csv`` or ``json`` (default: from the file extension).
    :param columns: columns to keep. :param filter: a row filter such as ``"qty > 0"``.
    :param cast: ``{"column": "arrow type"}`` applied after reading.
    :param incremental: read only what is new or changed, e.g. ``{"column": "updated_at"}``:
        ``"mode": "interval"`` (default) keeps ``data_interval_start <= column < data_interval_end``,
        deterministic and right for backfills; ``"mode": "watermark"`` keeps ``column >=`` the newest
        value already loaded, read from ``"watermark": {"postgres_conn_id": ..., "table": ...}``
        (for sources whose intervals are unreliable, or after an outage). A run without a data
        interval (a manual run with no logical date) uses the watermark when one is configured.
        For date-partitioned files set ``"partitioned": True``: the column is the partition
        directory (``.../updated_date=2024-01-02/``) and only the window's partitions are read.
    """

    stage = "extract"
    writes_output = True
    template_fields = (*RayDataBaseOperator.template_fields, "source", "filter", "incremental")

    def __init__(
        self,
        *,
        source: str | list[str] | dict[str, Any],
        format: str | None = None,
        columns: list[str] | None = None,
        filter: str | None = None,
        cast: dict[str, str] | None = None,
        incremental: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.source = source
        self.format = format
        self.columns = columns
        self.filter = filter
        self.cast = cast
        self.incremental = incremental
        if cast:
            validate_steps([{"op": "cast", "columns": cast}])
        if incremental and "{{" not in str(incremental.get("mode")):
            check_incremental(incremental, self.task_id)

    def stage_spec(self, context) -> dict[str, Any]:
        source = dict(self.source) if isinstance(self.source, dict) else {"kind": "files", "path": self.source}
        options = {"format": self.format, "columns": self.columns, "filter": self.filter, "cast": self.cast}
        source.update({k: v for k, v in options.items() if v is not None})
        if self.incremental:
            source["window"] = self.window(context)
        return {"source": resolve_connection(source)}

    def window(self, context) -> dict[str, Any]:
        """The incremental window ``[start, end)`` of this run, as ISO timestamps (None: open)."""
        spec = self.incremental or {}
        try:
            check_incremental(spec, self.task_id)
        except ValueError as exc:
            raise AirflowFailException(str(exc)) from None
        mode = spec.get("mode", "interval")
        start, end = context.get("data_interval_start"), context.get("data_interval_end")
        if mode == "interval" and (start is None or end is None):
            if not spec.get("watermark"):
                raise AirflowFailException(
                    f"{self.task_id}: this run has no data interval (a manual run without a logical date); "
                    "give it a logical date, or configure a 'watermark' to catch up from"
                )
            mode = "watermark"
        elif mode == "interval" and start == end:
            raise AirflowFailException(
                f"{self.task_id}: the data interval is empty ({start} to {end}): Airflow 3 cron schedules such as "
                "'@daily' have zero-length intervals; schedule with CronDataIntervalTimetable or a timedelta"
            )
        if mode == "watermark":
            where = spec["watermark"]
            start = postgres_watermark(where["postgres_conn_id"], where["table"], where.get("column", spec["column"]))
            end = None
        window = {
            "column": spec["column"],
            "start": start.isoformat() if start is not None else None,
            "end": end.isoformat() if end is not None else None,
            "partitioned": bool(spec.get("partitioned")),
        }
        self.log.info("Incremental (%s): %s from %s to %s", mode, window["column"], window["start"], window["end"])
        return window


def check_incremental(spec: dict[str, Any], task_id: str) -> None:
    mode = spec.get("mode", "interval")
    if mode not in ("interval", "watermark") or not spec.get("column"):
        raise ValueError(f"{task_id}: incremental needs a 'column' and mode 'interval' or 'watermark' (got {mode!r})")
    if mode == "watermark" and not spec.get("watermark"):
        raise ValueError(f"{task_id}: incremental mode 'watermark' needs 'watermark' (where it is read)")


class RayDataTransformOperator(RayDataBaseOperator):
    """Apply a user function and/or declarative steps to a dataset, as one Ray Data pipeline.

    :param input: the upstream reference (``upstream.output``), or a templated URI/JSON.
    :param fn: a function (or ``"package.module:function"``) for ``map_batches``; it runs first.
    :param batch_format: ``pandas`` (default), ``pyarrow`` or ``numpy``.
    :param steps: declarative steps (select, rename, cast, filter, drop_duplicates, join,
        aggregate, map_batches); see ``airflow_provider_raydata.runtime.transforms``.
    """

    stage = "transform"
    writes_output = True
    template_fields = (*RayDataBaseOperator.template_fields, "input", "steps", "fn_kwargs")

    def __init__(
        self,
        *,
        input: DatasetRefLike,
        fn: Callable | str | None = None,
        batch_format: str = "pandas",
        batch_size: int | None = None,
        concurrency: int | tuple[int, int] | None = None,
        num_cpus: float | None = None,
        num_gpus: float | None = None,
        fn_kwargs: dict[str, Any] | None = None,
        steps: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.input = input
        self.fn = fn
        self.fn_kwargs = fn_kwargs
        self.map_options = {
            "batch_format": batch_format,
            "batch_size": batch_size,
            "concurrency": concurrency,
            "num_cpus": num_cpus,
            "num_gpus": num_gpus,
        }
        self.steps = list(steps or [])
        if fn is None and not self.steps:
            raise ValueError(f"{self.task_id}: give a function (fn=...) or steps=[...]")
        validate_steps(self.all_steps(self.steps, self.fn_kwargs))

    def all_steps(self, steps: list[dict[str, Any]], fn_kwargs: dict | None) -> list[dict[str, Any]]:
        if self.fn is None:
            return steps
        head = {"op": "map_batches", "fn": self.fn, "fn_kwargs": fn_kwargs or None, **self.map_options}
        return [{k: v for k, v in head.items() if v is not None}, *steps]

    def stage_spec(self, context) -> dict[str, Any]:
        steps = self.all_steps(self.steps, self.fn_kwargs)
        for step in steps:
            if step["op"] == "map_batches":
                ship_by_value(step["fn"])
            if step["op"] == "join":
                step["right"] = self.resolve_input(step["right"], "join 'right'")
        return {"input": self.resolve_input(self.input), "steps": steps}


class RayDataQualityOperator(RayDataBaseOperator):
    """Run data-quality checks in one pass on the cluster and set failing rows aside.

    :param input: the upstream reference (``upstream.output``), or a templated URI/JSON.
    :param checks: check dicts (templated), e.g. ``{"check": "null_fraction", "column": "x",
        "leq_to": 0.01, "policy": "warn"}``; see ``airflow_provider_raydata.runtime.specs.CHECKS``.
    :param score_threshold: fail the task when the quality score (the fraction of rows passing
        every row-level check) is below this.

    Returns the reference of the rows that passed every row-level check (the input reference
    itself when none failed); pushes the quarantined rows' reference under ``quarantine`` and
    the report under ``quality_report``. A failed ``fail`` check raises ``AirflowFailException``.
    """

    stage = "quality"
    writes_output = True
    template_fields = (*RayDataBaseOperator.template_fields, "input", "checks")

    def __init__(
        self,
        *,
        input: DatasetRefLike,
        checks: list[dict[str, Any]],
        score_threshold: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.input = input
        self.checks = checks
        self.score_threshold = score_threshold
        if score_threshold is not None and not 0 <= score_threshold <= 1:
            raise ValueError(f"{self.task_id}: score_threshold must be between 0 and 1")
        validate_checks(checks, input.get("schema") if isinstance(input, dict) else None)

    def stage_spec(self, context) -> dict[str, Any]:
        source = self.resolve_input(self.input)
        checks = [self.prepare_check(check, context) for check in self.checks]
        try:  # after rendering, against the input's schema: before anything reaches the cluster
            validate_checks(checks, source.get("schema") if isinstance(source, dict) else None)
        except ValueError as exc:
            raise AirflowFailException(f"{self.task_id}: {exc}") from None
        return {"input": source, "checks": checks, "score_threshold": self.score_threshold}

    def prepare_check(self, check: dict[str, Any], context) -> dict[str, Any]:
        check = dict(check)
        if check.get("check") == "freshness":
            check.setdefault("as_of", interval_end(context))
        elif check.get("check") == "row_count_change" and "previous_rows" not in check:
            check["previous_rows"] = previous_rows(context["ti"])
        elif check.get("check") == "referential_integrity":
            check["ref"] = self.resolve_input(check.get("ref"), "referential_integrity 'ref'")
        elif check.get("check") == "custom" and "fn" in check:
            ship_by_value(check["fn"])
        return check

    def handle_result(self, context, result: dict[str, Any]) -> Any:
        report, ti = result["report"], context["ti"]
        ti.xcom_push(key="quality_report", value=report)
        ti.xcom_push(key="quarantine", value=result["quarantine"])
        self.log.info("Quality report:\n%s", format_report(report))
        for check in report["checks"]:
            if not check["passed"] and check["policy"] == "warn":
                self.log.warning("Quality check %s failed (policy warn): %s", check["name"], describe(check))
        failed = [c for c in report["checks"] if not c["passed"] and c["policy"] == "fail"]
        if failed:
            details = "; ".join(f"{c['name']}: {describe(c)}" for c in failed)
            raise AirflowFailException(f"{len(failed)} of {len(report['checks'])} quality checks failed: {details}")
        return result["ref"]


def interval_end(context) -> str:
    """The time freshness is measured against: the data interval's end, else the run's run_after."""
    end = context.get("data_interval_end") or getattr(context.get("dag_run"), "run_after", None)
    return (end or datetime.now(UTC)).isoformat()


def previous_rows(ti) -> int | None:
    """Rows in at this task's previous successful run (from its ``quality_report`` XCom)."""
    previous = ti.get_previous_ti(state=TaskInstanceState.SUCCESS)
    report = None
    if previous is not None:
        report = ti.xcom_pull(task_ids=ti.task_id, key="quality_report", run_id=previous.run_id)
    rows = report.get("rows_in") if isinstance(report, dict) else None
    log.info("Previous successful run of %s: %s, rows in: %s", ti.task_id, previous and previous.run_id, rows)
    return rows


class RayDataLoadOperator(RayDataBaseOperator):
    """Publish a dataset to its destination. A retry or rerun of the same run never duplicates.

    :param destination: a lake directory (local, s3:// or gs://) or a destination dict:
        ``{"kind": "parquet", "path": ...}`` or ``{"kind": "postgres", "postgres_conn_id": ...,
        "table": "schema.table"}``, the same with ``"kind": "snowflake", "snowflake_conn_id"`` or
        ``"kind": "bigquery", "gcp_conn_id"`` (optional there: ``sequence_by`` to keep the latest row per key
        in an upsert, ``delete_column`` naming a boolean column whose true rows are deleted).
    :param mode: lake: ``append``, ``overwrite``, ``overwrite_partitions``. PostgreSQL:
        ``append``, ``overwrite``, ``replace_partition`` (delete the rows whose ``partition_by``
        values are in this load, then insert), ``upsert`` (on ``keys``).
    :param partition_by: partition columns (e.g. a date column).
    :param keys: key columns for ``upsert``.

    PostgreSQL loads are published on the cluster in one transaction (append and
    replace_partition: one COPY straight into the table; overwrite and upsert: parallel COPYs into
    a staging table first, then a swap or ``INSERT ... ON CONFLICT``), which this task commits
    once it has the stage's result. Snowflake loads stage the rows on the cluster (PUT of Parquet
    files + COPY INTO) and this task publishes them in one transaction. Either way a failed or
    killed load leaves the table as it was. BigQuery loads need
    no Ray stage: its load jobs read the gs:// Parquet handoff directly (``replace_partition``
    there needs ``"partition": "YYYYMMDD"`` and loads into ``table$YYYYMMDD``).
    """

    stage = "load"
    template_fields = (*RayDataBaseOperator.template_fields, "input", "destination")

    def __init__(
        self,
        *,
        input: DatasetRefLike,
        destination: str | dict[str, Any],
        mode: str = "append",
        partition_by: list[str] | None = None,
        keys: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.input = input
        self.destination = destination
        self.mode = mode
        self.partition_by = partition_by
        self.keys = keys
        try:
            validate_destination(self.destination_spec())
        except ValueError as exc:
            raise ValueError(f"{self.task_id}: {exc}") from None

    def destination_spec(self) -> dict[str, Any]:
        if isinstance(self.destination, dict):
            destination = dict(self.destination)
        else:
            destination = {"kind": "parquet", "path": self.destination}
        destination.setdefault("mode", self.mode)
        for key, value in (("partition_by", self.partition_by), ("keys", self.keys)):
            if value:
                destination.setdefault(key, value)
        return destination

    @staticmethod
    def load_id(ti) -> str:
        """One id per (DAG run, task): a retry replaces or skips what an earlier try published."""
        return hashlib.sha1(f"{ti.dag_id}\n{ti.run_id}\n{ti.task_id}".encode()).hexdigest()[:16]

    def execute(self, context) -> Any:
        destination = self.destination_spec()
        if destination.get("kind") != "bigquery":
            return super().execute(context)
        # BigQuery load jobs read the gs:// Parquet handoff themselves: no Ray stage is needed.
        ti = context["ti"]
        ref = self.resolve_input(self.input)
        load = load_bigquery(ref, destination, self.load_id(ti))
        rows_in = ref.get("num_rows") if isinstance(ref, dict) else None
        metrics = {"rows_in": rows_in, "rows_out": load["rows_written"], "seconds": load["seconds"]}
        ti.xcom_push(key="metrics", value=metrics)
        return self.handle_result(context, {"load": load})

    def stage_spec(self, context) -> dict[str, Any]:
        destination = resolve_connection(self.destination_spec())
        load_id = self.load_id(context["ti"])
        return {"input": self.resolve_input(self.input), "destination": destination, "load_id": load_id}

    def handle_result(self, context, result: dict[str, Any]) -> Any:
        if result.get("awaiting_commit"):  # PostgreSQL: published on the cluster, committed now
            self.hook.commit_stage()
            load = result["load"]
        else:  # Snowflake: staged on the cluster, published here in one transaction
            try:
                load = publish_load(self.destination_spec(), result["load"])
            except ValueError as exc:  # the data cannot be published as asked: a retry would not help
                raise AirflowFailException(f"{self.task_id}: {exc}") from exc
        if load.get("skipped"):
            self.log.warning(
                "This run's append to %s was already published by an earlier try: nothing appended twice",
                load["destination"],
            )
        self.log.info(
            "Loaded %s rows into %s (%s; partitions: %s)",
            load["rows_written"],
            load["destination"],
            load["mode"],
            _listed(load.get("partitions") or []),
        )
        return load


def _listed(names: list[str], most: int = 10) -> str:
    """A list for the task log: a bulk load may replace thousands of partitions."""
    if len(names) <= most:
        return ", ".join(names) or "-"
    return f"{len(names)}: {', '.join(names[: most // 2])}, ..., {', '.join(names[-most // 2 :])}"


ACTIVE_STATES = ["queued", "running"]
RUN_ID_BATCH = 50  # run ids per count request: they travel in the API call's query string
LOGGED_PATHS = 50  # paths listed in the task log (and in the returned summary: 2x)


class RayDataStagingCleanupOperator(RayDataBaseOperator):
    """Staging retention: remove staging outputs older than ``retention_days``, never those of
    a DAG run that is still queued or running, and drop orphaned PostgreSQL staging tables.

    :param retention_days: age (days, templated) after which a run's staging directory goes,
        counted from its newest file; uncommitted attempts of killed stages and lake
        ``_staging`` leftovers go by their own age.
    :param staging_uri: the staging area to clean (default: as for the other operators).
    :param lake_paths: lake destinations whose ``_staging/`` leftovers are removed (templated).
    :param postgres_conn_ids: ``postgres`` connections whose orphaned ``_raydata_*`` staging
        tables are dropped (older than ``retention_days``, and only if no session holds a lock on them).
    :param postgres_schemas: the schemas searched for them.
    :param dry_run: report what would be removed; remove nothing.

    The files are cleaned on the cluster (the staging area may be reachable only from there),
    the tables from here. Airflow 3 tasks have no metadata-database access and the Task SDK
    cannot list the active runs of every DAG; it can count a DAG's runs by run id and state
    (``get_dr_count``). So the file cleanup takes two stages: (1) a dry run lists the run
    directories older than the cutoff with the real ``(dag_id, run_id)`` from their
    ``_SUCCESS`` markers; (2) here each candidate's DAG is asked for queued/running runs (one
    count per DAG; only when it has some, counts per batch of run ids, then per run); (3) the
    cluster removes the candidates found inactive, with the first stage's clock and among those
    candidates only, so a directory that aged or appeared in between is never removed unchecked.
    A run directory with nothing committed has no recoverable run id (its name is escaped): it
    is kept while its DAG has any active run (its dead attempts still go by age). A run that
    becomes active in the seconds between (2) and (3) is not protected, nor is an active run
    reading another run's staging output by URI: keep ``retention_days`` well above that reach.
    """

    stage = "cleanup"
    template_fields = (*RayDataBaseOperator.template_fields, "retention_days", "lake_paths", "dry_run")

    def __init__(
        self,
        *,
        retention_days: float | str = 7,
        lake_paths: Sequence[str] = (),
        postgres_conn_ids: Sequence[str] = (),
        postgres_schemas: Sequence[str] = ("public",),
        dry_run: bool | str = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.retention_days = retention_days
        self.lake_paths = list(lake_paths)
        self.postgres_conn_ids = list(postgres_conn_ids)
        self.postgres_schemas = list(postgres_schemas)
        self.dry_run = dry_run

    def execute(self, context) -> dict[str, Any]:
        ti = context["ti"]
        days, dry_run = float(self.retention_days), str(self.dry_run).lower() in ("true", "1", "yes")
        if days <= 0:
            raise AirflowFailException(f"{self.task_id}: retention_days must be positive, got {self.retention_days}")
        errors: list[str] = []
        tables: dict[str, list[str]] = {}
        for conn_id in self.postgres_conn_ids:  # first: it must not depend on the cluster being up
            try:
                tables[conn_id] = sweep_postgres(conn_id, self.postgres_schemas, timedelta(days=days), dry_run)
            except Exception as exc:
                self.log.exception("Sweeping PostgreSQL staging tables through %s failed", conn_id)
                errors.append(f"PostgreSQL {conn_id}: {type(exc).__name__}: {exc}")
        spec = {
            "stage": self.stage,
            "name": f"{ti.dag_id}.{ti.task_id}",
            "staging_uri": self.resolve_staging_uri(),
            "lake_paths": self.lake_paths,
            "older_than_days": days,
            "storage": self.storage(),
            "tuning": self.tuning,
            "produced_by": {
                "dag_id": ti.dag_id,
                "run_id": ti.run_id,
                "task_id": ti.task_id,
                "try_number": ti.try_number,
            },
        }
        ti.xcom_push(key=DASHBOARD_XCOM_KEY, value=self.hook.settings.dashboard_url or "")
        self.log.info("Listing staging older than %s days on %s", days, self.hook.settings.where)
        listed = self.hook.run_stage({**spec, "dry_run": True}, timeout=self.stage_timeout)
        summary, seconds = listed["cleanup"], listed["metrics"]["seconds"]
        candidates = [entry for entry in summary["removed"] if entry["kind"] == "run"]
        active = find_active_runs(candidates, ti.get_dr_count)
        if summary["removed"]:
            spec.update(
                dry_run=dry_run, active_runs=active, now=summary["now"], candidates=[c["run"] for c in candidates]
            )
            cleaned = self.hook.run_stage(spec, timeout=self.stage_timeout)
            summary, seconds = cleaned["cleanup"], seconds + cleaned["metrics"]["seconds"]
        self.log.info("%s", format_cleanup(summary, tables))
        ti.xcom_push(key="metrics", value={"rows_in": None, "rows_out": None, "seconds": round(seconds, 3)})
        errors += [f"{e['path']}: {e['error']}" for e in summary["errors"]]
        if errors:
            raise AirflowException(f"Staging cleanup: {len(errors)} errors: " + "; ".join(errors[:10]))
        limit = 2 * LOGGED_PATHS
        return {
            **{k: v for k, v in summary.items() if k not in ("removed", "kept")},
            "removed": summary["removed"][:limit],
            "kept": summary["kept"][:limit],
            "postgres_tables_dropped": tables,
        }


def find_active_runs(candidates: list[dict[str, Any]], count_runs: Callable[..., int]) -> list[list[str]]:
    """``[dag_id, run_id]`` of the candidate runs (``clean_staging`` run entries) that are queued
    or running; ``count_runs``: the Task SDK's ``get_dr_count``."""
    by_dag: dict[str, list[dict[str, Any]]] = {}
    for candidate in candidates:
        by_dag.setdefault(candidate["dag_id"], []).append(candidate)
    active: list[list[str]] = []
    for dag_id, runs in sorted(by_dag.items()):
        if not count_runs(dag_id=dag_id, states=ACTIVE_STATES):
            continue  # the usual case: one request clears all of a DAG's old runs
        known = sorted({run["run_id"] for run in runs if run["run_id"]})
        for start in range(0, len(known), RUN_ID_BATCH):
            batch = known[start : start + RUN_ID_BATCH]
            if count_runs(dag_id=dag_id, run_ids=batch, states=ACTIVE_STATES):
                active += [[dag_id, r] for r in batch if count_runs(dag_id=dag_id, run_ids=[r], states=ACTIVE_STATES)]
        # Nothing committed: no real run id to ask about. Keep it while the DAG has active runs.
        active += [[dag_id, run["run"].split("/")[1]] for run in runs if not run["run_id"]]
    return active


def format_cleanup(summary: dict[str, Any], tables: dict[str, list[str]]) -> str:
    """The cleanup summary for the task log."""
    verb = "Would remove" if summary["dry_run"] else "Removed"
    counts = summary.get("counts") or {}
    active = [e for e in summary["kept"] if e.get("reason") == "active"]
    lines = [
        f"Staging retention on {summary['staging_uri']} (older than {summary['older_than_days']} days, before "
        f"{summary['cutoff']}): {verb.lower()} {counts.get('run', 0)} runs, {counts.get('attempt', 0)} "
        f"uncommitted attempts, {counts.get('lake_staging', 0)} lake staging directories "
        f"({summary['files_removed']} files, {summary['bytes_removed'] / 1e6:.1f} MB); kept {len(active)} old "
        f"runs that are active, {len(summary['kept']) - len(active)} other old runs, "
        f"{summary['recent_runs']} recent runs",
    ]
    lines += [
        f"  {verb} {e['kind']} {e['path']} (newest file {e['newest']})" for e in summary["removed"][:LOGGED_PATHS]
    ]
    lines += [f"  Kept {e['path']}: {e['reason']}" for e in summary["kept"][:LOGGED_PATHS]]
    for conn_id, names in tables.items():
        lines.append(
            f"PostgreSQL {conn_id}: {'would drop' if summary['dry_run'] else 'dropped'} {len(names)} "
            f"orphaned staging tables{': ' + ', '.join(names) if names else ''}"
        )
    return "\n".join(lines)


def format_report(report: dict[str, Any]) -> str:
    """The report as a table for the task log."""
    rows = [("check", "value", "expected", "policy", "result")]
    for c in report["checks"]:
        value = f"{c['value']:.6g}" if isinstance(c["value"], float) else str(c["value"])
        if c.get("failed_rows"):
            value += f" ({c['failed_rows']} of {c['evaluated_rows']} rows failed)"
        result = "PASS" if c["passed"] else ("FAIL" if c.get("policy", "fail") == "fail" else "WARN")
        rows.append((_cell(c["name"]), _cell(value), _cell(c["expected"]), c.get("policy", "fail"), result))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    if "rows_in" in report:
        lines.append(
            f"rows in {report['rows_in']} = passed {report['rows_passed']} + quarantined "
            f"{report['rows_quarantined']}; quality score {report['score']:.4f}"
        )
    return "\n".join(lines)


def _cell(text: str, width: int = 70) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def describe(check: dict[str, Any]) -> str:
    text = f"got {check['value']}, expected {check['expected']}"
    if check.get("examples"):
        text += f" (e.g. {check['examples']})"
    return text


def ship_by_value(fn: Callable | str) -> None:
    """Pickle the code of a user function's module by value, unless it is an installed package.

    Functions defined in a DAG file or a project folder live in modules the cluster cannot
    import (Airflow even loads DAG files under generated names); installed packages are
    expected on the cluster too and stay pickled by reference.
    """
    if isinstance(fn, str):
        return
    module = inspect.getmodule(fn)
    path = getattr(module, "__file__", None)
    if module is None or path is None:
        return
    installed = ("site-packages", "dist-packages", os.path.dirname(os.__file__))
    if not any(marker in path for marker in installed):
        from ray import cloudpickle

        cloudpickle.register_pickle_by_value(module)

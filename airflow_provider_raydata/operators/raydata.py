"""The Ray Data operators (Airflow worker). Thin: they render templates, build a
``contracts.StageSpec``, hand it to ``RayHook`` and push the small result to XCom; the rows never
pass through the Airflow worker. Run bookkeeping is in ``run_context``, task-log text in
``reporting``, connections in ``hooks``."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta
from functools import cached_property
from typing import Any

from airflow.configuration import conf
from airflow.sdk import BaseOperator, BaseOperatorLink
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException

from airflow_provider_raydata.contracts import (
    CleanupRequest,
    DataError,
    DatasetRef,
    Destination,
    IncrementalWindow,
    LoadResult,
    Metrics,
    ProducedBy,
    Source,
    StageResult,
    StageSpec,
    XCom,
    is_data_error,
)
from airflow_provider_raydata.hooks.bigquery import load_bigquery
from airflow_provider_raydata.hooks.connections import resolve_connection
from airflow_provider_raydata.hooks.postgres import sweep_postgres
from airflow_provider_raydata.hooks.ray import MissingInput, RayHook
from airflow_provider_raydata.hooks.snowflake import publish_snowflake
from airflow_provider_raydata.hooks.storage import aws_storage_options, gcs_storage_options
from airflow_provider_raydata.pickling import ship_by_value
from airflow_provider_raydata.reporting import LOGGED_PATHS, describe, format_cleanup, format_report, listed
from airflow_provider_raydata.run_context import (
    check_incremental,
    find_active_runs,
    incremental_window,
    interval_end,
    previous_rows,
)
from airflow_provider_raydata.runtime.paths import task_prefix
from airflow_provider_raydata.runtime.specs import validate_checks, validate_steps
from airflow_provider_raydata.runtime.tuning import validate_tuning
from airflow_provider_raydata.triggers.raydata import RayDataStageTrigger

DatasetRefLike = dict[str, Any] | str


class RayDashboardLink(BaseOperatorLink):
    """'Ray Dashboard' button on a task: its stage's page in the dashboard of the cluster that ran it."""

    name = "Ray Dashboard"

    def get_link(self, operator: BaseOperator, *, ti_key) -> str:
        from airflow.sdk.execution_time.xcom import XCom as XComModel

        return XComModel.get_value(ti_key=ti_key, key=XCom.DASHBOARD_URL) or ""


def produced_by(ti) -> ProducedBy:
    return ProducedBy(dag_id=ti.dag_id, run_id=ti.run_id, task_id=ti.task_id, try_number=ti.try_number)


def plain_input(value: Any) -> Any:
    """A reference as users pass it, decoded: a dict (XCom), a JSON string of one (a template) or a URI."""
    return json.loads(value) if isinstance(value, str) and value.lstrip().startswith("{") else value


def parse_input(value: Any, name: str = "input") -> DatasetRef:
    try:
        return DatasetRef.parse(plain_input(value), name)
    except DataError as exc:  # no reference, or not one: a retry would not make it one
        raise AirflowFailException(str(exc)) from None


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
    :param tuning: overrides of the runtime's Ray Data settings (``runtime.tuning``), checked at parse time.
    :param stage_timeout: seconds before the remote stage is cancelled and the task fails.
    :param deferrable: free the worker slot while the stage runs: the task submits the stage
        and defers to a trigger that polls the stage service (default: Airflow's
        ``[operators] default_deferrable``). Needs an ``http(s)://`` (stage service) connection;
        over ``ray://`` the task waits in its slot as before.
    :param poll_interval: how long each of the trigger's reads of a deferred stage waits on the
        service for the stage to end (its end is seen at once; its log lines arrive at this pace).
    :param wait_before_deferring: seconds a deferrable task waits for its stage before it defers;
        a stage that ends sooner finishes in the task, without a trigger or a second task process
        (default: ``[raydata] wait_before_deferring``, 5).
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
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        poll_interval: float = 2.0,
        wait_before_deferring: float = conf.getfloat("raydata", "wait_before_deferring", fallback=5.0),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.wait_before_deferring = wait_before_deferring
        self.raydata_conn_id = raydata_conn_id
        self.staging_uri = staging_uri
        self.storage_options = storage_options
        self.aws_conn_id = aws_conn_id
        self.gcp_conn_id = gcp_conn_id
        self.tuning = tuning
        self.connect_timeout = connect_timeout
        self.stage_timeout = stage_timeout
        try:
            validate_tuning(tuning)
        except ValueError as exc:
            raise ValueError(f"{self.task_id}: {exc}") from None

    @cached_property
    def hook(self) -> RayHook:
        return RayHook(raydata_conn_id=self.raydata_conn_id, connect_timeout=self.connect_timeout)

    def stage_fields(self, context) -> dict[str, Any]:
        """This stage's own fields of its ``StageSpec`` (source, input, steps, checks, ...)."""
        raise NotImplementedError

    def stage_spec(self, ti, **fields: Any) -> StageSpec:
        """This task's ``StageSpec``: what every stage carries, and its own ``fields``."""
        return StageSpec(
            stage=self.stage,
            name=f"{ti.dag_id}.{ti.task_id}@{ti.run_id}",  # the task's name in the Ray dashboard
            produced_by=produced_by(ti),
            storage=self.storage(),
            tuning=self.tuning or {},
            **fields,
        )

    def execute(self, context) -> Any:
        ti = context["ti"]
        fields = self.stage_fields(context)
        if self.writes_output:
            fields["output_uri"] = task_prefix(self.resolve_staging_uri(), ti.dag_id, ti.run_id, ti.task_id)
        spec = self.stage_spec(ti, **fields)
        self.push_dashboard_link(ti)
        self.log.info("Running %s stage on %s", self.stage, self.hook.settings.label)
        self.hook.on_stage_page = lambda: self.push_dashboard_link(ti)
        if self.defers():
            # A stage that ends within wait_before_deferring finishes here: deferring it would cost a
            # second task process, and a trigger that fires at once can race the scheduler (see README).
            started = time.time()
            result = self.hook.start_stage(spec, wait=self.wait_before_deferring)
            self.push_dashboard_link(ti)
            if result is None:
                stage_id = self.hook.stage_id
                self.log.info(
                    "Stage %s still runs after %.0fs; deferring until it ends", stage_id, time.time() - started
                )
                deadline = started + self.stage_timeout if self.stage_timeout else None
                trigger = RayDataStageTrigger(
                    self.raydata_conn_id,
                    stage_id,
                    deadline,
                    self.poll_interval,
                    log_offset=self.hook.log_offset,
                    deferred_at=time.time(),
                )
                self.defer(trigger=trigger, method_name="execute_complete")
            return self.finish_stage(context, result)
        try:
            result = self.hook.run_stage(spec, timeout=self.stage_timeout)
        finally:
            self.push_dashboard_link(ti)
        return self.finish_stage(context, result)

    def push_dashboard_link(self, ti) -> None:
        """The 'Ray Dashboard' link: the stage's own page once it started, the dashboard before."""
        link = self.hook.dashboard_link()
        if link != getattr(self, "_pushed_link", None):  # each push is a round trip to the API server
            ti.xcom_push(key=XCom.DASHBOARD_URL, value=link)
            self._pushed_link = link

    def defers(self) -> bool:
        if not self.deferrable:
            return False
        if self.hook.settings.transport == "service":
            return True
        self.log.warning(
            "deferrable=True needs a stage service connection (http(s)://); on %s the task waits in its slot",
            self.hook.settings.label,
        )
        return False

    def execute_complete(self, context, event: dict[str, Any]) -> Any:
        """Resumed after the trigger fired: the stage's result from the service, then as ``execute``."""
        if event["status"] == "timeout":
            raise AirflowException(
                f"Stage {event['stage_id']} did not finish within {self.stage_timeout}s on "
                f"{self.hook.settings.label}; it was cancelled"
            )
        if event["status"] != "done":
            raise AirflowException(f"Lost stage {event['stage_id']} while deferred: {event.get('message')}")
        try:
            result = self.hook.finished_stage(event["stage_id"])
        finally:
            self.push_dashboard_link(context["ti"])
        return self.finish_stage(context, result)

    def finish_stage(self, context, result: StageResult) -> Any:
        try:
            return self._after_stage(context, result)
        except BaseException:
            try:
                self.hook.commit_held_load(commit=False)  # a load held open on the cluster: roll it back now
            except Exception as exc:  # its own wait on the cluster rolls it back anyway
                self.log.warning("Could not roll back the load's transaction now: %s", exc)
            raise

    def _after_stage(self, context, result: StageResult) -> Any:
        metrics = result.metrics
        self.log.info(
            "%s stage: rows in %s, rows out %s, %.2fs on the cluster",
            self.stage,
            "-" if metrics.rows_in is None else metrics.rows_in,
            metrics.rows_out,
            metrics.seconds,
        )
        context["ti"].xcom_push(key=XCom.METRICS, value=metrics.to_dict())
        return self.handle_result(context, result)

    def handle_result(self, context, result: StageResult) -> Any:
        if result.ref is None:
            return None
        self.log.info("Committed %s", result.ref.uri)
        return result.ref.to_dict()

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


ON_EMPTY = ("continue", "skip", "fail")
ON_MISSING = ("retry", "skip", "fail")


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
    :param partition_columns: hive-style folders of a files source (``.../day=2024-03-10/...``) to
        read as typed columns, e.g. ``{"day": "date32"}``. Folders not named here add no column: a
        table never gains a column the user did not ask for.
    :param incremental: read only what is new or changed, e.g. ``{"column": "updated_at"}``:
        ``"mode": "interval"`` (default) keeps ``data_interval_start <= column < data_interval_end``,
        deterministic and right for backfills; ``"mode": "watermark"`` keeps ``column >=`` the newest
        value already loaded, read from ``"watermark": {"postgres_conn_id": ..., "table": ...}``
        (for sources whose intervals are unreliable, or after an outage). A run without a data
        interval (a manual run with no logical date) uses the watermark when one is configured.
        For date-partitioned files set ``"partitioned": True``: the column is the partition
        directory (``.../updated_date=2024-01-02/``) and only the window's partitions are read.
    :param on_empty: what a run whose source holds no rows does: ``"continue"`` (default) commits
        an empty dataset that keeps the source's columns and types (CSV header, Parquet schema, the
        query's description, ``cast``), and the stages after it run on zero rows; ``"skip"`` marks
        this task and the tasks after it skipped, with the reason; ``"fail"`` fails the task
        without retries.
    :param on_missing: what a run whose source has no file or partition at all does (for a SQL
        source there is always a result, so only ``on_empty`` applies): ``"retry"`` (default) fails
        the try and lets Airflow retry it (data may arrive late); ``"skip"`` or ``"fail"`` (no retries).
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
        partition_columns: dict[str, str] | None = None,
        on_empty: str = "continue",
        on_missing: str = "retry",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        for name, value, allowed in (("on_empty", on_empty, ON_EMPTY), ("on_missing", on_missing, ON_MISSING)):
            if value not in allowed:
                raise ValueError(f"{self.task_id}: {name} must be one of {', '.join(allowed)}, not {value!r}")
        self.on_empty = on_empty
        self.on_missing = on_missing
        self.partition_columns = partition_columns
        self.source = source
        self.format = format
        self.columns = columns
        self.filter = filter
        self.cast = cast
        self.incremental = incremental
        for types in (cast, partition_columns):
            if types:
                validate_steps([{"op": "cast", "columns": types}])  # type names known at parse time
        if incremental and "{{" not in str(incremental.get("mode")):
            check_incremental(incremental, self.task_id)
        self.source_spec()  # checked at parse time (templated values again once rendered)

    def source_spec(self) -> Source:
        """The source as declared (``contracts.Source``); a problem names this task."""
        options = {
            "format": self.format,
            "columns": self.columns,
            "filter": self.filter,
            "cast": self.cast,
            "partition_columns": self.partition_columns,
        }
        try:
            return Source.from_user(self.source, **options)
        except DataError as exc:
            raise DataError(f"{self.task_id}: {exc}") from None

    def stage_fields(self, context) -> dict[str, Any]:
        try:
            source = self.source_spec()
        except DataError as exc:
            raise AirflowFailException(str(exc)) from None
        if self.incremental:
            source = replace(source, window=self.window(context))
        return {"source": resolve_connection(source)}

    def execute(self, context) -> Any:
        with self.missing_input_policy():
            return super().execute(context)

    def execute_complete(self, context, event: dict[str, Any]) -> Any:
        with self.missing_input_policy():
            return super().execute_complete(context, event)

    def source_label(self) -> str:
        """The source in the user's terms, for a message."""
        source = self.source_spec()
        if source.kind == "files":
            return f"The source {', '.join(source.paths)}"
        if source.table:
            return f"The {source.kind} table {source.table}"
        return f"The {source.kind} query on {source.default_conn_id}"

    @contextmanager
    def missing_input_policy(self) -> Iterator[None]:
        try:
            yield
        except MissingInput as exc:
            if self.on_missing == "skip":
                raise AirflowSkipException(f"{exc} (on_missing='skip')") from None
            if self.on_missing == "fail":
                raise AirflowFailException(f"{exc} (on_missing='fail')") from None
            raise

    def handle_result(self, context, result: StageResult) -> Any:
        ref = result.ref
        if ref is not None and ref.num_rows == 0:
            where = self.source_label()
            if self.on_empty == "skip":
                raise AirflowSkipException(f"{where} has no rows for this run (on_empty='skip')")
            if self.on_empty == "fail":
                raise AirflowFailException(f"{where} has no rows for this run (on_empty='fail')")
            if not ref.schema:
                raise AirflowFailException(
                    f"{where} has no rows for this run, and nothing declares its columns (a file format "
                    "without a header, and no cast): declare them with cast={...}, or set on_empty='skip'"
                )
            columns = ", ".join(f"{name} {kind}" for name, kind in ref.schema.items())
            self.log.info("%s has no rows for this run; its columns go on: %s", where, columns)
        return super().handle_result(context, result)

    def window(self, context) -> IncrementalWindow:
        """The incremental window ``[start, end)`` of this run (``run_context.incremental_window``)."""
        return incremental_window(self.incremental or {}, context, self.task_id)


class RayDataTransformOperator(RayDataBaseOperator):
    """Apply a user function and/or declarative steps to a dataset, as one Ray Data pipeline.

    :param input: the upstream reference (``upstream.output``), or a templated URI/JSON.
    :param fn: a function (or ``"package.module:function"``) for ``map_batches``; it runs first.
    :param batch_format: ``pandas`` (default), ``pyarrow`` or ``numpy``. In pandas, integer and
        boolean columns are nullable dtypes (``Int64``, ``boolean``): with nulls they stay integers.
    :param output_schema: ``{"column": "arrow type"}`` for the columns ``fn`` adds or retypes. A
        column it leaves alone, or fills with values that fit, keeps its type whatever pandas
        infers (a ``decimal128(38, 10)`` stays one); a column whose values no longer fit its
        type fails the task unless declared here.
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
        output_schema: dict[str, str] | None = None,
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
            "output_schema": output_schema,
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

    def stage_fields(self, context) -> dict[str, Any]:
        steps = self.all_steps(self.steps, self.fn_kwargs)
        for step in steps:
            if step["op"] == "map_batches":
                ship_by_value(step["fn"])
            if step["op"] == "join":
                step["right"] = parse_input(step["right"], "join 'right'")
        return {"input": parse_input(self.input), "steps": tuple(steps)}


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

    def stage_fields(self, context) -> dict[str, Any]:
        source = plain_input(self.input)
        checks = [self.prepare_check(check, context) for check in self.checks]
        try:  # after rendering, against the input's schema: before anything reaches the cluster
            validate_checks(checks, source.get("schema") if isinstance(source, dict) else None)
        except ValueError as exc:
            raise AirflowFailException(f"{self.task_id}: {exc}") from None
        return {
            "input": parse_input(source),
            "checks": tuple(checks),
            "score_threshold": self.score_threshold,
        }

    def prepare_check(self, check: dict[str, Any], context) -> dict[str, Any]:
        check = dict(check)
        if check.get("check") == "freshness":
            check.setdefault("as_of", interval_end(context))
        elif check.get("check") == "row_count_change" and "previous_rows" not in check:
            check["previous_rows"] = previous_rows(context["ti"])
        elif check.get("check") == "referential_integrity":
            parse_input(check.get("ref"), "referential_integrity 'ref'")  # a missing one fails here
            check["ref"] = plain_input(check["ref"])
        elif check.get("check") == "custom" and "fn" in check:
            ship_by_value(check["fn"])
        return check

    def handle_result(self, context, result: StageResult) -> Any:
        report, ti = result.report, context["ti"]
        ti.xcom_push(key=XCom.QUALITY_REPORT, value=report.to_dict())
        ti.xcom_push(key=XCom.QUARANTINE, value=result.quarantine.to_dict())
        self.log.info("Quality report:\n%s", format_report(report.to_dict()))
        for check in report.checks:
            if not check.passed and check.policy == "warn":
                self.log.warning("Quality check %s failed (policy warn): %s", check.name, describe(check))
        failed = [c for c in report.checks if not c.passed and c.policy == "fail"]
        if failed:
            details = "; ".join(f"{c.name}: {describe(c)}" for c in failed)
            raise AirflowFailException(f"{len(failed)} of {len(report.checks)} quality checks failed: {details}")
        return result.ref.to_dict()


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
        self.destination_spec()  # checked at parse time (templated values again once rendered)

    def destination_spec(self) -> Destination:
        """The destination as declared (``contracts.Destination``); a problem names this task."""
        try:
            return Destination.from_user(self.destination, self.mode, self.keys, self.partition_by)
        except DataError as exc:
            raise DataError(f"{self.task_id}: {exc}") from None

    @staticmethod
    def load_id(ti) -> str:
        """One id per (DAG run, task): a retry replaces or skips what an earlier try published."""
        return hashlib.sha1(f"{ti.dag_id}\n{ti.run_id}\n{ti.task_id}".encode()).hexdigest()[:16]

    def execute(self, context) -> Any:
        try:
            destination = self.destination_spec()
        except DataError as exc:
            raise AirflowFailException(str(exc)) from None
        if destination.kind != "bigquery":
            return super().execute(context)
        # BigQuery load jobs read the gs:// Parquet handoff themselves: no Ray stage is needed.
        ti = context["ti"]
        ref = parse_input(self.input)
        with self.data_errors_fail(destination):
            load = load_bigquery(ref, destination, self.load_id(ti))
        metrics = Metrics(ref.num_rows, load.rows_written, load.seconds or 0.0)
        ti.xcom_push(key=XCom.METRICS, value=metrics.to_dict())
        return self.loaded(load)

    def stage_fields(self, context) -> dict[str, Any]:
        destination = resolve_connection(self.destination_spec())
        return {"input": parse_input(self.input), "destination": destination, "load_id": self.load_id(context["ti"])}

    def handle_result(self, context, result: StageResult) -> Any:
        if result.held:  # PostgreSQL: published on the cluster, committed now
            self.hook.commit_held_load()
            load = result.load
        elif result.staged is not None:  # Snowflake: staged on the cluster, published here in one transaction
            destination = self.destination_spec()
            with self.data_errors_fail(destination):
                load = publish_snowflake(destination.default_conn_id, result.staged)
        else:
            load = result.load
        return self.loaded(load)

    @contextmanager
    def data_errors_fail(self, destination: Destination) -> Iterator[None]:
        """Publishing on the worker: a data error (``contracts.is_data_error``) fails the task
        without retries; anything else is retried."""
        try:
            yield
        except AirflowException:
            raise
        except Exception as exc:
            if is_data_error(exc):
                where = destination.table or destination.path
                raise AirflowFailException(f"{self.task_id}: loading into {where}: {exc}") from exc
            raise

    def loaded(self, load: LoadResult) -> dict[str, Any]:
        if load.skipped:
            self.log.warning(
                "This run's append to %s was already published by an earlier try: nothing appended twice",
                load.destination,
            )
        partitions = listed(load.partitions)
        self.log.info(
            "Loaded %s rows into %s (%s; partitions: %s)", load.rows_written, load.destination, load.mode, partitions
        )
        return load.to_dict()


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
        request = CleanupRequest(
            staging_uri=self.resolve_staging_uri(), older_than_days=days, lake_paths=tuple(self.lake_paths)
        )
        spec = self.stage_spec(ti, cleanup=request)
        self.push_dashboard_link(ti)
        self.log.info("Listing staging older than %s days on %s", days, self.hook.settings.label)
        listed_runs = self.hook.run_stage(spec, timeout=self.stage_timeout)
        summary, seconds = listed_runs.cleanup, listed_runs.metrics.seconds
        candidates = [entry for entry in summary.removed if entry.kind == "run"]
        active = find_active_runs(candidates, ti.get_dr_count)
        if summary.removed:
            removal = replace(
                request,
                dry_run=dry_run,
                active_runs=tuple(tuple(run) for run in active),
                now=summary.now,
                candidates=tuple(c.run for c in candidates),
            )
            cleaned = self.hook.run_stage(replace(spec, cleanup=removal), timeout=self.stage_timeout)
            summary, seconds = cleaned.cleanup, seconds + cleaned.metrics.seconds
        self.log.info("%s", format_cleanup(summary, tables))
        ti.xcom_push(key=XCom.METRICS, value=Metrics(None, None, round(seconds, 3)).to_dict())
        errors += [f"{path}: {error}" for path, error in summary.errors]
        if errors:
            raise AirflowException(f"Staging cleanup: {len(errors)} errors: " + "; ".join(errors[:10]))
        return {
            **summary.to_dict(most=2 * LOGGED_PATHS),
            "postgres_tables_dropped": tables,
        }

"""Every value that crosses a process boundary, declared once.

The package's code runs in three places: the DAG parser and the Airflow worker (operators,
hooks), the Ray cluster (``runtime``) and, for Snowflake/BigQuery publishing, the worker again
through ``runtime`` code. What travels between them is declared here:

    operator --StageSpec--> RayHook --(Ray Client)--> StageExecutor --> StageProcess: run_stage
    operator <--StageResult-- ...                       (DatasetRef, Metrics, LoadResult, ...)
    XCom: DatasetRef.to_dict(), Metrics, LoadResult, the quality report (keys in ``XCom``)

Frozen dataclasses rather than TypedDicts: a value is built and validated once (from the
user's dicts and strings, at DAG parse time where they are static) and never enriched in place
on its way; a misspelt or missing field fails where the value is built, not three processes
later (TypedDicts check nothing at run time); and the runtime reads attributes, so a field's
name is spelled here and at its uses, never as a string key in several modules. Plain JSON is
the contract only at the edges users see (XCom, the ``_SUCCESS`` marker of a committed
dataset): there ``to_dict``/``from_dict`` convert.

The step and check languages (``{"op": "filter", ...}``, ``{"check": "unique", ...}``) are
declared by their tables in ``runtime.specs`` and ``runtime.check_kinds``; a stage carries them
as validated plain data because users write them as such.

Imports neither Airflow nor Ray nor pyarrow: the parser, the worker and the cluster import it.
"""

from __future__ import annotations

import json
import types
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

# The shape of what the worker and the stage executor exchange (StageSpec, StageResult and the
# executor's methods). The executor's actor name carries it: a cluster still running an executor
# that speaks another protocol gets a new one instead of failing every stage.
PROTOCOL = 3


class XCom:
    """The XCom keys a stage's task pushes (besides its return value)."""

    METRICS = "metrics"
    QUALITY_REPORT = "quality_report"
    QUARANTINE = "quarantine"
    DASHBOARD_URL = "ray_dashboard_url"


# --- plain data at the edges (XCom, JSON) ------------------------------------------------------


def to_plain(value: Any, secrets: bool = False) -> Any:
    """A declared value as dicts and lists (tuples become lists). Fields kept out of reprs
    (connection parameters, storage credentials) are left out unless ``secrets``: only the wire
    to the cluster carries them, never XCom or a log."""
    if is_dataclass(value):
        return {f.name: to_plain(getattr(value, f.name), secrets) for f in fields(value) if secrets or f.repr}
    if isinstance(value, (list, tuple)):
        return [to_plain(item, secrets) for item in value]
    if isinstance(value, Mapping):
        return {key: to_plain(item, secrets) for key, item in value.items()}
    return value


def from_plain(cls: type, data: Mapping[str, Any]) -> Any:
    """The inverse of ``to_plain`` for a declared class: nested declared values are rebuilt from
    their field types; an unknown field fails, naming it."""
    hints = get_type_hints(cls)
    unknown = sorted(set(data) - {f.name for f in fields(cls)})
    if unknown:
        raise DataError(f"Unknown field(s) {unknown} for {cls.__name__}")
    return cls(**{name: _decode(hints[name], value) for name, value in data.items()})


def _decode(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    if get_origin(hint) in (Union, types.UnionType):  # the arm that fits the plain value
        arms = [arg for arg in get_args(hint) if arg is not type(None)]
        fits = [arm for arm in arms if _fits(arm, value)]
        hint = (fits or arms)[0]
    if is_dataclass(hint) and isinstance(value, Mapping):
        return from_plain(hint, value)
    if get_origin(hint) is tuple:
        inner = get_args(hint)[0] if get_args(hint) else Any
        return tuple(_decode(inner, item) for item in value)
    return value


def _fits(hint: Any, value: Any) -> bool:
    origin = get_origin(hint) or hint
    if isinstance(value, list):
        return origin in (tuple, list)
    if isinstance(value, Mapping):
        return is_dataclass(hint) or origin in (dict, Mapping)
    return isinstance(origin, type) and isinstance(value, origin)


# --- failures: retried or not ----------------------------------------------------------------


class DataError(ValueError):
    """The data or the request cannot succeed as given (bad input, an unknown column, a broken
    constraint, a key repeated in an upsert): a retry would fail the same way, so the task
    fails without retrying. Raised by the runtime and by ``classify`` for drivers' errors."""


class MissingInputError(FileNotFoundError):
    """A source has no file or partition to read at all (not zero rows): data may arrive late, so
    Airflow retries it; the extract's ``on_missing`` may skip or fail the task instead."""


def is_missing_input(exc: BaseException) -> bool:
    return any(isinstance(error, MissingInputError) for error in _chain(exc))


# PostgreSQL/Snowflake SQLSTATE classes that no retry fixes: data exception, integrity
# constraint violation, syntax error or access rule violation (unknown column, no privilege).
DATA_SQLSTATE_CLASSES = ("22", "23", "42")
# BigQuery error reasons (google.api_core's ``errors[].reason``) that no retry fixes.
# ("duplicate" is not one: a job insert re-sent after a timeout answers it, and the retry finds the job.)
_BIGQUERY_DATA_REASONS = ("invalid", "invalidQuery", "notFound", "accessDenied")
# pyarrow's errors about the data itself (a cast that does not fit, a corrupt file's footer).
ARROW_DATA_ERRORS = ("ArrowInvalid", "ArrowTypeError", "ArrowNotImplementedError")


def is_data_error(exc: BaseException) -> bool:
    """The one failure classification: True when ``exc`` (or what it wraps) means the task must
    fail without retries; everything else (lost connections and workers, timeouts, quotas,
    rate limits, server errors) is retried by Airflow.

    Data errors: ``DataError`` (raised by this package's validation of specs and data), pyarrow's
    ArrowInvalid/ArrowTypeError/ArrowNotImplementedError, SQLSTATE classes 22/23/42 from
    PostgreSQL (psycopg) and Snowflake, and BigQuery's invalid/invalidQuery/notFound/accessDenied
    reasons. A batch function's exception about its data arrives as a ``DataError``
    (``runtime.batches.UserFunctionError``). Other exceptions are retried."""
    for error in _chain(exc):
        if isinstance(error, DataError):
            return True
        if type(error).__name__ in ARROW_DATA_ERRORS and type(error).__module__.startswith("pyarrow"):
            return True
        sqlstate = getattr(error, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate[:2] in DATA_SQLSTATE_CLASSES:
            return True
        reasons = [e.get("reason") for e in getattr(error, "errors", None) or [] if isinstance(e, Mapping)]
        if getattr(error, "code", None) in (400, 403, 404, 409) and reasons:
            return all(reason in _BIGQUERY_DATA_REASONS for reason in reasons)
    return False


def _chain(exc: BaseException):
    """``exc`` and the exceptions behind it (``raise ... from``, Ray's ``RayTaskError.cause``)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = getattr(exc, "cause", None) or exc.__cause__


# --- dataset references: the XCom payload ------------------------------------------------------


@dataclass(frozen=True)
class ProducedBy:
    """The Airflow task (try) that produced a dataset or runs a stage."""

    dag_id: str = ""
    run_id: str = ""
    task_id: str = ""
    try_number: int = 1

    @property
    def task(self) -> tuple[str, str, str]:
        """One Airflow task of one run: its tries supersede each other."""
        return self.dag_id, self.run_id, self.task_id


@dataclass(frozen=True)
class DatasetRef:
    """A committed Parquet dataset: its URI (an attempt directory with a ``_SUCCESS`` marker) and
    what downstream stages need without reading it. As XCom and as the marker: ``to_dict()``."""

    uri: str
    format: str = "parquet"
    num_rows: int | None = None
    schema: dict[str, str] = field(default_factory=dict)  # column -> Arrow type name
    size_bytes: int | None = None
    num_files: int | None = None
    produced_by: ProducedBy = field(default_factory=ProducedBy)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> DatasetRef:
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in value.items() if k in known}  # older markers may carry more
        if not data.get("uri"):
            raise DataError(f"Not a dataset reference (no 'uri'): {dict(value)!r}")
        produced_by = data.get("produced_by") or {}
        data["produced_by"] = ProducedBy(**{k: v for k, v in produced_by.items() if k in ProducedBy.__annotations__})
        return cls(**data)

    @classmethod
    def parse(cls, value: Any, name: str = "input") -> DatasetRef:
        """What users pass as ``input=``: a reference dict (XCom), its JSON (a template) or a URI."""
        if isinstance(value, DatasetRef):
            return value
        if value is None or value == "":
            raise DataError(f"No {name} dataset reference was given (or the upstream task pushed none)")
        if isinstance(value, str) and value.lstrip().startswith("{"):
            value = json.loads(value)
        if isinstance(value, str):
            return cls(uri=value)  # resolved (and its marker checked) on the cluster
        if isinstance(value, Mapping):
            return cls.from_dict(value)
        raise DataError(f"{name}: not a dataset reference or URI: {value!r}")


@dataclass(frozen=True)
class Metrics:
    """What every stage reports (XCom ``metrics``)."""

    rows_in: int | None
    rows_out: int | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- the quality report -----------------------------------------------------------------------


@dataclass(frozen=True)
class CheckResult:
    """One check's verdict. ``details`` holds what the kind measured beside its value
    (``failed_rows``, ``evaluated_rows``, ``examples``, ``note``, ...); XCom shows them inline."""

    name: str
    check: str
    column: str | list[str] | None
    value: Any
    expected: str
    passed: bool
    policy: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        plain = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "details"}
        return {**plain, **self.details}


@dataclass(frozen=True)
class QualityReport:
    """A quality stage's report (XCom ``quality_report``): rows in = rows passed + quarantined."""

    passed: bool
    rows_in: int
    rows_passed: int
    rows_quarantined: int
    score: float  # the fraction of rows that pass every row-level check
    score_threshold: float | None
    checks: tuple[CheckResult, ...]

    @property
    def failed(self) -> int:
        return sum(not c.passed for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        plain = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "checks"}
        checks = [c.to_dict() for c in self.checks]
        return {**plain, "num_rows": self.rows_in, "failed": self.failed, "checks": checks}


# Source/destination kinds that name an Airflow connection: kind -> (user's key, default id).
CONNECTION_KEYS = {
    "postgres": ("postgres_conn_id", "postgres_default"),
    "snowflake": ("snowflake_conn_id", "snowflake_default"),
    "bigquery": ("gcp_conn_id", "google_cloud_default"),
}


def _kind_and_fields(cls: type, data: dict[str, Any], what: str, kinds) -> tuple[str, dict[str, Any]]:
    """A user's source or destination dict: its kind (checked), its connection id under one name,
    and no field the declaration lacks (a typo fails at parse time, naming the field)."""
    kind = data.pop("kind", "files" if what == "source" else "parquet")
    if _templated(kind):  # checked once rendered
        return kind, data
    if kind not in kinds:
        raise DataError(f"Unknown {what} kind {kind!r}; known kinds: {', '.join(kinds)}")
    conn_key, _ = CONNECTION_KEYS.get(kind, (None, None))
    if conn_key and conn_key in data:
        data["conn_id"] = data.pop(conn_key)
    unknown = sorted(set(data) - {f.name for f in fields(cls)})
    if unknown:
        raise DataError(f"Unknown field(s) {unknown} in a {kind} {what}")
    return kind, data


def _templated(value: Any) -> bool:
    return isinstance(value, str) and "{{" in value


# --- sources ------------------------------------------------------------------------------------

SOURCE_KINDS = ("files", "postgres", "snowflake", "bigquery")
FILE_FORMATS = ("parquet", "csv", "json")


@dataclass(frozen=True)
class IncrementalWindow:
    """The rows an incremental extract keeps: ``start <= column < end`` (ISO timestamps; None: open).
    ``partitioned``: the column is a date partition directory (``.../column=YYYY-MM-DD/``)."""

    column: str
    start: str | None = None
    end: str | None = None
    partitioned: bool = False


@dataclass(frozen=True)
class Source:
    """What an extract reads, built from the user's ``source`` (a path, a list of paths or a dict).

    ``conn`` holds the connection parameters resolved on the worker (secrets: never in a repr);
    ``conn_id`` names that Airflow connection."""

    kind: Literal["files", "postgres", "snowflake", "bigquery"] = "files"
    path: str | tuple[str, ...] | None = None  # files: a path, glob, directory, or several
    format: str | None = None  # files: parquet, csv or json (default: from the extension)
    columns: tuple[str, ...] | None = None
    filter: str | None = None  # a row filter such as "qty > 0" (runtime.expressions)
    cast: dict[str, str] = field(default_factory=dict)  # column -> Arrow type name
    # files: hive folders (day=2024-03-10/) read as these typed columns; others add no column
    partition_columns: dict[str, str] = field(default_factory=dict)
    window: IncrementalWindow | None = None
    query: str | None = None  # SQL kinds: a query with bound parameters, or a table
    table: str | dict | None = None
    parameters: dict[str, Any] | list | None = None
    shard_key: str | None = None  # postgres: read in parallel shards of this column
    num_shards: int | None = None  # postgres
    num_streams: int | None = None  # bigquery
    location: str | None = None  # bigquery
    conn_id: str | None = None
    conn: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_user(cls, value: str | list[str] | Mapping[str, Any], **options: Any) -> Source:
        """``options`` (the operator's ``format``, ``columns``, ``filter``, ``cast``) apply where
        given. Raises ``DataError`` naming an unknown kind, field or format."""
        data = dict(value) if isinstance(value, Mapping) else {"kind": "files", "path": value}
        data.update({k: v for k, v in options.items() if v is not None})
        kind, data = _kind_and_fields(cls, data, "source", SOURCE_KINDS)
        if isinstance(data.get("path"), list):
            data["path"] = tuple(data["path"])
        if data.get("columns") is not None:
            data["columns"] = tuple(data["columns"])
        if isinstance(data.get("window"), Mapping):
            data["window"] = IncrementalWindow(**data["window"])
        data["cast"] = dict(data.get("cast") or {})
        data["partition_columns"] = dict(data.get("partition_columns") or {})
        source = cls(kind=kind, **data)
        if kind == "files" and not source.path:
            raise DataError("a files source needs 'path'")
        if source.format is not None and not _templated(source.format) and source.format not in FILE_FORMATS:
            raise DataError(f"Unknown file format {source.format!r}; use one of {', '.join(FILE_FORMATS)}")
        if kind != "files" and source.partition_columns:
            raise DataError(f"partition_columns apply to files (hive folders), not to a {kind} source")
        if kind != "files" and bool(source.query) == bool(source.table):
            raise DataError(f"A {kind} source needs exactly one of 'query' or 'table'")
        return source

    @property
    def paths(self) -> list[str]:
        return list(self.path) if isinstance(self.path, tuple) else [self.path]

    @property
    def default_conn_id(self) -> str | None:
        return self.conn_id or CONNECTION_KEYS.get(self.kind, (None, None))[1]


# --- destinations and the one upsert semantics -------------------------------------------------

DESTINATION_MODES = {
    "parquet": ("append", "overwrite", "overwrite_partitions", "upsert"),
    "postgres": ("append", "overwrite", "replace_partition", "upsert"),
    "snowflake": ("append", "overwrite", "replace_partition", "upsert"),
    "bigquery": ("append", "overwrite", "replace_partition", "upsert"),
}


@dataclass(frozen=True)
class UpsertRule:
    """How an upsert merges a load into its target; ``runtime.upsert`` states the rules and
    every dialect (lake, PostgreSQL, Snowflake, BigQuery) implements exactly them."""

    keys: tuple[str, ...]
    sequence_by: str | None = None
    delete_column: str | None = None

    @property
    def first_load_is_insert(self) -> bool:
        """Into an empty target every row goes in as it is: no version to pick, no delete to apply."""
        return not self.sequence_by and not self.delete_column


@dataclass(frozen=True)
class Destination:
    """Where a load writes, built from the user's ``destination`` (a path or a dict) once.

    ``conn`` holds the connection parameters resolved on the worker by the provider's own hook
    (secrets: never in a repr, log or exception); ``conn_id`` names that Airflow connection."""

    kind: Literal["parquet", "postgres", "snowflake", "bigquery"] = "parquet"
    mode: str = "append"
    path: str | None = None  # parquet
    table: str | dict | None = None  # warehouses: "schema.table", "db.schema.table" or a dict
    partition_by: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()
    sequence_by: str | None = None
    delete_column: str | None = None
    partition: str | None = None  # bigquery replace_partition: "YYYYMMDD"
    project: str | None = None  # bigquery
    location: str | None = None  # bigquery
    min_rows_per_file: int | None = None  # parquet
    conn_id: str | None = None
    conn: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_user(
        cls,
        value: str | Mapping[str, Any],
        mode: str | None = None,
        keys: list[str] | None = None,
        partition_by: list[str] | None = None,
    ) -> Destination:
        """A path means a Parquet lake; ``mode``/``keys``/``partition_by`` (the operator's
        arguments) apply where the dict does not say. Raises ``DataError`` naming the problem."""
        data = dict(value) if isinstance(value, Mapping) else {"kind": "parquet", "path": value}
        data.setdefault("mode", mode or "append")
        for name, given in (("keys", keys), ("partition_by", partition_by)):
            data[name] = tuple(data.get(name) or given or ())
        kind, data = _kind_and_fields(cls, data, "destination", DESTINATION_MODES)
        destination = cls(kind=kind, **data)
        destination.validate()
        return destination

    def validate(self) -> None:
        if _templated(self.kind) or _templated(self.mode):
            return  # checked once rendered
        modes = DESTINATION_MODES[self.kind]
        if self.mode not in modes:
            raise DataError(f"Unknown mode {self.mode!r} for a {self.kind} destination; use {', '.join(modes)}")
        if self.mode in ("overwrite_partitions", "replace_partition") and not self.partition_by:
            raise DataError(f"mode {self.mode!r} needs partition_by")
        if self.mode == "upsert" and not self.keys:
            raise DataError("mode 'upsert' needs keys (the columns that identify a row)")
        if self.kind == "parquet" and not self.path:
            raise DataError("a parquet destination needs 'path'")
        if self.kind != "parquet" and not self.table:
            raise DataError(f"a {self.kind} destination needs 'table'")
        if self.kind == "bigquery" and self.mode == "replace_partition" and not self.partition:
            raise DataError(
                "a bigquery replace_partition needs 'partition': the partition to replace, e.g. '{{ ds_nodash }}'"
            )

    @property
    def upsert(self) -> UpsertRule:
        return UpsertRule(self.keys, self.sequence_by, self.delete_column)

    @property
    def default_conn_id(self) -> str | None:
        return self.conn_id or CONNECTION_KEYS.get(self.kind, (None, None))[1]

    def with_conn(self, conn: dict[str, Any]) -> Destination:
        return replace(self, conn=conn)

    def check_columns(self, columns: list[str]) -> None:
        """The columns the mode needs must be in the dataset (checked on the cluster)."""
        named = [*self.keys, *self.partition_by, *(c for c in (self.sequence_by, self.delete_column) if c)]
        for column in named:
            if column not in columns:
                raise DataError(f"Unknown column {column!r} for {self.mode}; dataset columns: {', '.join(columns)}")


@dataclass(frozen=True)
class LoadResult:
    """What a load published (XCom return value of a load task)."""

    destination: str
    mode: str
    rows_written: int
    load_id: str = ""
    rows_deleted: int = 0
    skipped: bool = False  # this run's append was already published by an earlier try
    partitions: list[str] = field(default_factory=list)
    files_written: int | None = None  # lake
    rows_in_partitions: int | None = None  # lake upsert: rows of the rewritten partitions
    copy_seconds: float | None = None  # postgres
    index_seconds: float | None = None  # postgres
    publish_seconds: float | None = None  # postgres
    seconds: float | None = None  # bigquery

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


# --- load plans: a load's decisions, made once and carried between its steps ----------------


@dataclass(frozen=True)
class PostgresPlan:
    """A PostgreSQL load as ``runtime.postgres.staging`` decided it, for ``publish`` (both on the cluster)."""

    destination: str  # "schema.table", as the ledger and messages name it
    schema: str
    table: str
    mode: str
    columns: list[str]
    upsert: UpsertRule
    partition_by: list[str]
    load_id: str
    uri: str  # the committed input
    files: list[str]  # its Parquet files
    column_types: list[str] | None = None  # PostgreSQL types, for a table this load creates
    staging_table: str | None = None  # overwrite and upsert: where the rows were copied first
    first_load: bool = False  # an upsert into a missing or empty table, staged like an overwrite
    rows_written: int = 0
    copy_seconds: float = 0.0
    index_seconds: float = 0.0  # building the staging table's indexes after its COPY


@dataclass(frozen=True)
class SnowflakePlan:
    """A Snowflake load staged on the cluster (``runtime.snowflake.staging``) and published by the
    task on the Airflow worker (``hooks.snowflake``)."""

    destination: str  # "database.schema.table"
    database: str
    schema: str
    table: str
    staging_table: str
    mode: str
    columns: list[str]
    upsert: UpsertRule
    partition_by: list[str]
    load_id: str
    rows_written: int
    created: bool  # the target did not exist when the load was staged


@dataclass(frozen=True)
class BigQueryPlan:
    """A BigQuery load's jobs, decided up front (``runtime.bigquery.load``; on the Airflow worker).
    ``load_config`` is the REST API's job configuration (Google's declared shape)."""

    destination: str  # "project.dataset.table"
    project: str
    mode: str
    load_id: str
    source_uris: list[str]  # the committed Parquet files, read by BigQuery itself
    load_config: dict[str, Any]
    location: str | None = None
    partitions: list[str] = field(default_factory=list)
    staging_table: str | None = None  # upsert: loaded first, then merged by ``merge_script``
    merge_script: str | None = None
    job_id_prefix: str | None = None  # append: the job id is the ledger


# --- stages ------------------------------------------------------------------------------------

STAGES = ("extract", "transform", "quality", "load", "cleanup")


@dataclass(frozen=True)
class CleanupRequest:
    """Staging retention (``runtime.retention.clean_staging``): one listing or removal pass."""

    staging_uri: str
    older_than_days: float
    lake_paths: tuple[str, ...] = ()
    dry_run: bool = True
    active_runs: tuple[tuple[str, str], ...] = ()
    now: str | None = None  # the listing pass's clock, reused by the removal pass
    candidates: tuple[str, ...] | None = None  # "dag/run" directories checked against Airflow


@dataclass(frozen=True)
class CleanupEntry:
    """A directory that staging retention removed (or would remove) or kept."""

    kind: Literal["run", "attempt", "lake_staging"]
    path: str  # a URI under the staging area or a lake
    files: int
    bytes: int
    newest: str | None  # the newest file's time (ISO)
    run: str | None = None  # "dag/run" directory, relative to the staging root
    dag_id: str | None = None  # from the run's _SUCCESS markers (run entries)
    run_id: str | None = None  # None: nothing committed there, so no real run id
    reason: str | None = None  # why a run was kept


@dataclass(frozen=True)
class CleanupSummary:
    """What one retention pass did (``runtime.retention.clean_staging``)."""

    staging_uri: str
    now: str  # the pass's clock (ISO); a removal pass reuses its listing pass's
    cutoff: str
    older_than_days: float
    dry_run: bool
    removed: tuple[CleanupEntry, ...]
    kept: tuple[CleanupEntry, ...]
    recent_runs: int
    errors: tuple[tuple[str, str], ...]  # (path, error)

    def count(self, kind: str) -> int:
        return sum(entry.kind == kind for entry in self.removed)

    @property
    def bytes_removed(self) -> int:
        return sum(entry.bytes for entry in self.removed)

    @property
    def files_removed(self) -> int:
        return sum(entry.files for entry in self.removed)

    def to_dict(self, most: int | None = None) -> dict[str, Any]:
        """As XCom shows it; ``most`` caps the entry lists (a sweep may remove thousands)."""
        plain = to_plain(self)
        plain["removed"], plain["kept"] = plain["removed"][:most], plain["kept"][:most]
        plain["errors"] = [{"path": path, "error": error} for path, error in self.errors]
        counts = {kind: self.count(kind) for kind in ("run", "attempt", "lake_staging") if self.count(kind)}
        return {**plain, "counts": counts, "bytes_removed": self.bytes_removed, "files_removed": self.files_removed}


@dataclass(frozen=True)
class StageSpec:
    """One stage, as the operator hands it to the cluster. Plain, picklable data: user functions
    travel as callables (pickled by value) or ``"package.module:function"`` references."""

    stage: Literal["extract", "transform", "quality", "load", "cleanup"]
    name: str  # shown in the Ray dashboard: "dag_id.task_id"
    produced_by: ProducedBy
    stage_id: str = ""  # set by RayHook: one id per submission
    storage: dict[str, Any] = field(default_factory=dict, repr=False)  # object-store options (secrets)
    tuning: dict[str, Any] = field(default_factory=dict)  # runtime.runner.DEFAULT_TUNING overrides
    output_uri: str | None = None  # the task's staging prefix (extract, transform, quality)
    source: Source | None = None  # extract
    input: DatasetRef | None = None  # transform, quality, load
    steps: tuple[dict[str, Any], ...] = ()  # transform: see runtime.specs.STEP_FIELDS
    checks: tuple[dict[str, Any], ...] = ()  # quality: see runtime.check_kinds
    score_threshold: float | None = None  # quality
    destination: Destination | None = None  # load
    load_id: str = ""  # load: one per (DAG run, task), so a retry replaces or skips its own load
    cleanup: CleanupRequest | None = None

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise DataError(f"Unknown stage {self.stage!r}; known stages: {', '.join(STAGES)}")


@dataclass(frozen=True)
class StageResult:
    """What a stage sends back: references and summaries, never rows.

    ``held`` marks a PostgreSQL load published in a transaction left open on the cluster: the
    task commits it through ``RayHook.commit_held_load`` once it holds this result."""

    stage: str
    metrics: Metrics
    ref: DatasetRef | None = None  # extract, transform, quality (the passing rows)
    input: DatasetRef | None = None
    report: QualityReport | None = None  # quality
    quarantine: DatasetRef | None = None  # quality
    load: LoadResult | None = None
    staged: SnowflakePlan | None = None  # a Snowflake load for the task to publish
    cleanup: CleanupSummary | None = None
    held: bool = False

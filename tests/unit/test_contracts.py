"""The declared shapes (``contracts.py``): built once from the user's dicts, validated where they
are built, plain data at the edges; and the one failure classification."""

from __future__ import annotations

import pyarrow as pa
import pytest

from airflow_provider_raydata.contracts import (
    CleanupRequest,
    DataError,
    DatasetRef,
    Destination,
    ProducedBy,
    Source,
    StageSpec,
    from_plain,
    is_data_error,
    to_plain,
)
from airflow_provider_raydata.runtime.tuning import validate_tuning


def test_a_stage_spec_survives_plain_json_and_keeps_secrets_out_of_its_repr():
    destination = Destination.from_user(
        {"kind": "postgres", "postgres_conn_id": "wh", "table": "public.t", "sequence_by": "at"},
        mode="upsert",
        keys=["id"],
    ).with_conn({"host": "db", "password": "pg-secret"})
    spec = StageSpec(
        stage="load",
        name="dag.load",
        produced_by=ProducedBy("dag", "run", "load", 2),
        storage={"aws_secret_access_key": "s3-secret"},
        input=DatasetRef.parse('{"uri": "/staging/a", "num_rows": 3}'),
        destination=destination,
        load_id="0123",
        cleanup=CleanupRequest("/staging", 7.0, active_runs=(("dag", "run"),)),
    )
    again = from_plain(StageSpec, to_plain(spec, secrets=True))  # the wire to the cluster
    assert again == spec and again.destination.conn == {"host": "db", "password": "pg-secret"}
    assert "pg-secret" not in str(to_plain(spec)) and "s3-secret" not in str(to_plain(spec))
    assert again.destination.upsert.keys == ("id",) and again.destination.upsert.sequence_by == "at"
    assert "pg-secret" not in repr(spec) and "s3-secret" not in repr(spec)
    files = StageSpec("extract", "d.e", ProducedBy(), source=Source.from_user(["/a.csv", "/b.csv"]))
    assert from_plain(StageSpec, to_plain(files)).source.paths == ["/a.csv", "/b.csv"]
    with pytest.raises(DataError, match=r"Unknown field\(s\) \['stagee'\] for StageSpec"):
        from_plain(StageSpec, {**to_plain(spec), "stagee": "load"})


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"kind": "parquett", "path": "/x"}, "Unknown destination kind 'parquett'"),
        ({"kind": "postgres", "table": "t", "sequnce_by": "at"}, r"Unknown field\(s\) \['sequnce_by'\] in a postgres"),
        ({"kind": "postgres", "table": "t", "mode": "merge"}, "Unknown mode 'merge' for a postgres destination"),
        ({"kind": "parquet"}, "a parquet destination needs 'path'"),
    ],
)
def test_destinations_name_their_problem(value, message):
    with pytest.raises(DataError, match=message):
        Destination.from_user(value)


def test_templated_kinds_and_modes_are_checked_once_rendered():
    templated = Destination.from_user({"kind": "{{ params.kind }}", "table": "t", "mode": "{{ params.mode }}"})
    assert templated.mode == "{{ params.mode }}"
    with pytest.raises(DataError, match="Unknown mode 'merge'"):
        Destination.from_user({"kind": "postgres", "table": "t", "mode": "merge"})


def test_sources_are_declared_and_their_typos_named():
    source = Source.from_user(["/a/*.csv", "/b/*.csv"], columns=["x"], filter="x > 1")
    assert source.paths == ["/a/*.csv", "/b/*.csv"] and source.columns == ("x",)
    with pytest.raises(DataError, match=r"Unknown field\(s\) \['querry'\] in a postgres source"):
        Source.from_user({"kind": "postgres", "querry": "SELECT 1"})
    with pytest.raises(DataError, match="Unknown file format 'xlsx'"):
        Source.from_user("/a.xlsx", format="xlsx")
    templated = Source.from_user({"path": "/in/{{ ds }}", "format": "{{ params.fmt }}"})  # checked once rendered
    assert templated.format == "{{ params.fmt }}"


def test_dataset_references_from_what_users_pass():
    assert DatasetRef.parse("s3://lake/a").uri == "s3://lake/a"
    ref = DatasetRef.parse({"uri": "/a", "num_rows": 2, "schema": {"id": "int64"}, "produced_by": {"dag_id": "d"}})
    assert ref.produced_by.dag_id == "d" and DatasetRef.from_dict(ref.to_dict()) == ref
    with pytest.raises(DataError, match="No join 'right' dataset reference"):
        DatasetRef.parse(None, "join 'right'")


def test_tuning_keys_are_checked_at_parse_time():
    validate_tuning({"parquet_footer_actors": 2, "shuffle_strategy": "hash_shuffle"})
    with pytest.raises(
        ValueError, match="Unknown tuning key 'parquet_footer_actor'; known keys: parquet_footer_actors"
    ):
        validate_tuning({"parquet_footer_actor": 2})
    with pytest.raises(ValueError, match="tuning 'min_rows_per_file' must be int"):
        validate_tuning({"min_rows_per_file": "many"})
    from airflow_provider_raydata.operators import RayDataExtractOperator

    with pytest.raises(ValueError, match="e: Unknown tuning key 'arrow_pandas'"):
        RayDataExtractOperator(task_id="e", source="/x", tuning={"arrow_pandas": True})


def data_and_transient_errors():
    import psycopg.errors as pg
    from google.api_core import exceptions as google
    from snowflake.connector import errors as snowflake

    data = [
        DataError("key repeated"),
        pa.ArrowInvalid("cannot cast"),
        pg.UniqueViolation("duplicate key"),
        pg.UndefinedColumn("no such column"),
        snowflake.ProgrammingError(msg="invalid identifier", errno=904, sqlstate="42000"),
        google.BadRequest("bad", errors=[{"reason": "invalidQuery"}]),
        google.NotFound("no table", errors=[{"reason": "notFound"}]),
        google.BadRequest("upsert: a key appears more than once", errors=[{"reason": "invalidQuery"}]),  # ERROR()
    ]
    transient = [
        ConnectionError("reset"),
        pg.OperationalError("server closed the connection"),
        pg.SerializationFailure("could not serialize"),
        snowflake.OperationalError(msg="timeout", errno=250003),
        google.Forbidden("quota", errors=[{"reason": "rateLimitExceeded"}]),
        google.TooManyRequests("slow down", errors=[{"reason": "rateLimitExceeded"}]),
        google.InternalServerError("backend", errors=[{"reason": "backendError"}]),
        RuntimeError("staging table is gone"),
        ValueError("raised by a user's function"),
        google.Conflict("Already Exists: Job", errors=[{"reason": "duplicate"}]),  # a re-sent job insert
        OSError("Cannot read the Parquet footer of s3://lake/a.parquet: connection reset"),
    ]
    return data, transient


def test_one_classification_decides_retry_or_not():
    data, transient = data_and_transient_errors()
    assert [type(e).__name__ for e in data if not is_data_error(e)] == []
    assert [type(e).__name__ for e in transient if is_data_error(e)] == []
    wrapped = RuntimeError("Stage failed")
    wrapped.cause = data[2]  # Ray's RayTaskError carries the cluster's exception as ``cause``
    assert is_data_error(wrapped)
    try:
        try:
            raise ValueError("bad row")
        except ValueError:
            raise ConnectionError("lost while cleaning up") from None
    except ConnectionError as handled:
        assert not is_data_error(handled)  # only explicit causes count, not what was being handled

"""Warehouse plumbing without a warehouse: BigQuery through google-cloud-bigquery's Client with
its HTTP transport faked (requests recorded, canned JSON answered), identifier quoting, and the
Airflow connections resolved into plain parameters. BigQuery is not tested against the real
service (see README.md)."""

from __future__ import annotations

import json
import re

import pytest
import requests

bigquery = pytest.importorskip("google.cloud.bigquery")

from airflow_provider_raydata.contracts import DatasetRef, Destination, Source  # noqa: E402
from airflow_provider_raydata.runtime.bigquery import common as bq_common  # noqa: E402
from airflow_provider_raydata.runtime.bigquery import load as bq  # noqa: E402
from airflow_provider_raydata.runtime.bigquery import read as bq_read  # noqa: E402
from airflow_provider_raydata.runtime.snowflake import common as sf  # noqa: E402

REF = {
    "uri": "gs://lake/staging/daily/run-1/transform/attempt-1-abcd1234",
    "num_rows": 42,
    "schema": {
        "id": "int64",
        "name": "large_string",
        "day": "date32[day]",
        "at": "timestamp[us, tz=UTC]",
        "local": "timestamp[us]",
        "amount": "decimal128(12, 2)",
        "deleted": "bool",
    },
}


class FakeBigQueryHttp:
    """Stands in for the Client's ``requests`` session: records each request, answers like BigQuery."""

    is_mtls = False

    def __init__(self, jobs: dict | None = None):
        self.requests: list[tuple[str, str, dict | None]] = []
        self.jobs = dict(jobs or {})

    def request(self, method, url, data=None, headers=None, timeout=None, **kwargs):
        path = url.split("/bigquery/v2", 1)[1].split("?")[0]
        body = json.loads(data) if data else None
        self.requests.append((method, path, body))
        if method == "POST" and re.fullmatch(r"/projects/[^/]+/jobs", path):
            job = {**body, "status": {"state": "DONE"}}
            if "load" in body["configuration"]:
                job["statistics"] = {"load": {"outputRows": "42"}}
            else:
                destination = {"projectId": "my-project", "datasetId": "_anon", "tableId": "anon_result"}
                job["configuration"]["query"]["destinationTable"] = destination
                job["statistics"] = {"query": {}}
            self.jobs[body["jobReference"]["jobId"]] = job
            return self.respond(200, job)
        if match := re.fullmatch(r"/projects/[^/]+/jobs/([^/]+)", path):
            found = self.jobs.get(match[1])
            return self.respond(200, found) if found else self.respond(404, {"error": {"code": 404, "message": "nf"}})
        if match := re.fullmatch(r"/projects/[^/]+/queries/([^/]+)", path):
            reference = self.jobs[match[1]]["jobReference"]
            return self.respond(200, {"jobComplete": True, "jobReference": reference, "totalRows": "0"})
        if method == "DELETE":
            return self.respond(204, None)
        raise AssertionError(f"unexpected request {method} {path}")

    @staticmethod
    def respond(status: int, payload) -> requests.Response:
        response = requests.Response()
        response.status_code, response._content = status, b"" if payload is None else json.dumps(payload).encode()
        response.headers["content-type"] = "application/json"
        response.request = requests.Request("GET", "https://bigquery.googleapis.com").prepare()
        return response

    def posted(self) -> list[dict]:
        return [body for method, _, body in self.requests if method == "POST"]


def client(http: FakeBigQueryHttp):
    from google.auth.credentials import AnonymousCredentials

    return bigquery.Client(project="my-project", credentials=AnonymousCredentials(), _http=http)


def run(mode: str, http: FakeBigQueryHttp | None = None, **destination):
    http = http or FakeBigQueryHttp()
    target = Destination.from_user({"kind": "bigquery", "table": "sales.orders", "mode": mode, **destination})
    plan = bq.load_plan(DatasetRef.from_dict(REF), target, "0123abcd", "my-project")
    return bq.publish(client(http), plan).to_dict(), http


def test_bigquery_load_jobs_by_mode_through_a_faked_transport():
    schema = [
        {"name": "id", "type": "INT64", "mode": "NULLABLE"},
        {"name": "name", "type": "STRING", "mode": "NULLABLE"},
        {"name": "day", "type": "DATE", "mode": "NULLABLE"},
        {"name": "at", "type": "TIMESTAMP", "mode": "NULLABLE"},
        {"name": "local", "type": "DATETIME", "mode": "NULLABLE"},
        {"name": "amount", "type": "NUMERIC", "mode": "NULLABLE"},
        {"name": "deleted", "type": "BOOL", "mode": "NULLABLE"},
    ]
    target = {"projectId": "my-project", "datasetId": "sales", "tableId": "orders"}

    # append: the job id comes from the load id; first a lookup (not found), then the load job
    result, http = run("append")
    (method, path, _), (_, _, job) = http.requests
    assert (method, path) == ("GET", f"/projects/my-project/jobs/{job['jobReference']['jobId']}")
    assert job["jobReference"]["jobId"].startswith("raydata_append_")
    load = job["configuration"]["load"]
    assert load["sourceUris"] == [REF["uri"] + "/*.parquet"] and load["sourceFormat"] == "PARQUET"
    assert load["writeDisposition"] == "WRITE_APPEND" and load["createDisposition"] == "CREATE_IF_NEEDED"
    assert load["destinationTable"] == target and load["schema"]["fields"] == schema
    assert result["rows_written"] == 42 and not result["skipped"]

    # a retry of the same run finds its finished job and appends nothing; a failed job is not the ledger
    retry, again = run("append", FakeBigQueryHttp(http.jobs))
    assert retry["skipped"] and [m for m, _, _ in again.requests] == ["GET"]
    failed = {k: {**v, "status": {"state": "DONE", "errorResult": {"reason": "invalid"}}} for k, v in http.jobs.items()}
    _, after_failure = run("append", FakeBigQueryHttp(failed))
    assert after_failure.posted()[0]["jobReference"]["jobId"].endswith("_1")

    # overwrite: one WRITE_TRUNCATE load job
    _, http = run("overwrite")
    (job,) = http.posted()
    assert job["configuration"]["load"]["writeDisposition"] == "WRITE_TRUNCATE"
    assert job["configuration"]["load"]["destinationTable"] == target

    # replace_partition: WRITE_TRUNCATE into the partition decorator
    result, http = run("replace_partition", partition_by=["day"], partition="2024-01-02")
    (job,) = http.posted()
    load = job["configuration"]["load"]
    assert load["destinationTable"]["tableId"] == "orders$20240102" and load["writeDisposition"] == "WRITE_TRUNCATE"
    assert load["timePartitioning"] == {"type": "DAY", "field": "day"} and result["partitions"] == ["20240102"]

    # upsert: load into staging, one MERGE script with backtick-quoted identifiers, drop staging
    _, http = run("upsert", keys=["id"], sequence_by="at", delete_column="deleted")
    staged, merge = http.posted()
    assert staged["configuration"]["load"]["destinationTable"]["tableId"] == "_raydata_0123abcd"
    assert staged["configuration"]["load"]["writeDisposition"] == "WRITE_TRUNCATE"
    sql = merge["configuration"]["query"]["query"]
    assert merge["configuration"]["query"]["useLegacySql"] is False
    assert sql.startswith(
        "CREATE TABLE IF NOT EXISTS `my-project`.`sales`.`orders` LIKE `my-project`.`sales`.`_raydata_0123abcd`;\n"
        "MERGE INTO `my-project`.`sales`.`orders` AS t USING (SELECT `id`, `name`, "
    )
    assert "QUALIFY ROW_NUMBER() OVER (PARTITION BY `id` ORDER BY `at` DESC) = 1) AS s ON t.`id` = s.`id`" in sql
    # runtime.upsert's rule 2: an older staged row never replaces or deletes a newer stored one
    newer = "(t.`at` IS NULL OR s.`at` IS NULL OR t.`at` <= s.`at`)"
    assert (
        f"WHEN MATCHED AND s.`deleted` AND {newer} THEN DELETE\nWHEN MATCHED AND {newer} THEN UPDATE SET `name` ="
        in sql
    )
    assert "WHEN NOT MATCHED AND NOT COALESCE(s.`deleted`, FALSE) THEN INSERT (`id`, " in sql
    assert http.requests[-1][:2] == ("DELETE", "/projects/my-project/datasets/sales/tables/_raydata_0123abcd")

    with pytest.raises(ValueError, match="reads the Parquet handoff from GCS"):
        target = Destination.from_user({"kind": "bigquery", "table": "sales.orders"})
        bq.load_plan(DatasetRef.from_dict({**REF, "uri": "s3://lake/x"}), target, "0123abcd", "my-project")


def test_bigquery_source_query_binds_typed_parameters():
    import datetime as dt

    http = FakeBigQueryHttp()
    text = "SELECT * FROM sales.orders WHERE day = @day AND id IN UNNEST(@ids) AND name = @name"
    parameters = {"day": dt.date(2024, 1, 2), "ids": [1, 2], "name": "x'; DROP TABLE t; --"}
    source = Source.from_user({"kind": "bigquery", "query": text, "parameters": parameters})
    table = bq_read.run_query(client(http), source, "my-project")
    assert table == "my-project._anon.anon_result"
    query = http.posted()[0]["configuration"]["query"]
    assert query["query"] == text  # the values never enter the SQL text
    assert {p["name"]: (p["parameterType"], p["parameterValue"]) for p in query["queryParameters"]} == {
        "day": ({"type": "DATE"}, {"value": "2024-01-02"}),
        "ids": ({"type": "ARRAY", "arrayType": {"type": "INT64"}}, {"arrayValues": [{"value": "1"}, {"value": "2"}]}),
        "name": ({"type": "STRING"}, {"value": "x'; DROP TABLE t; --"}),
    }
    by_table = Source.from_user({"kind": "bigquery", "table": "sales.orders"})
    assert bq_read.run_query(client(http), by_table, "my-project") == "my-project.sales.orders"


@pytest.mark.parametrize(
    "name", ["sales.orders`; DROP TABLE x; --", "sales.a.b.c", "sal es.orders", "Bad_Project.sales.orders", "orders"]
)
def test_bigquery_rejects_hostile_or_malformed_table_names(name):
    with pytest.raises(ValueError, match="Invalid BigQuery"):
        bq_common.table_parts(name, "my-project")


def test_identifiers_are_quoted():
    assert bq_common.quote("we`ird\\name") == "`we\\`ird\\\\name`"
    assert sf.quote('evil"; DROP TABLE "src"; --') == '"evil""; DROP TABLE ""src""; --"'
    assert sf.table_parts("db.sch.t", {}) == ("db", "sch", "t")
    assert sf.table_parts("t", {"database": "DB", "schema": "PUBLIC"}) == ("DB", "PUBLIC", "t")
    with pytest.raises(ValueError, match="needs a database and schema"):
        sf.table_parts("t", {})


def test_validation_and_connections_resolve_to_plain_parameters(monkeypatch):
    from airflow_provider_raydata.hooks.connections import resolve_connection
    from airflow_provider_raydata.operators import RayDataLoadOperator

    with pytest.raises(ValueError, match="replace_partition needs 'partition'"):
        RayDataLoadOperator(
            task_id="l",
            input="gs://x",
            destination={"kind": "bigquery", "table": "d.t"},
            mode="replace_partition",
            partition_by=["day"],
        )
    with pytest.raises(ValueError, match="a snowflake destination needs 'table'"):
        RayDataLoadOperator(task_id="l", input="gs://x", destination={"kind": "snowflake"})

    extra = {"account": "acme-xy123", "database": "DB", "warehouse": "WH", "protocol": "http", "port": 8080}
    connection = {"conn_type": "snowflake", "login": "etl", "password": "s3cret-pw", "schema": "PUBLIC", "extra": extra}
    monkeypatch.setenv("AIRFLOW_CONN_SF_UNIT", json.dumps(connection))
    source = resolve_connection(Source.from_user({"kind": "snowflake", "snowflake_conn_id": "sf_unit", "table": "t"}))
    assert source.conn_id == "sf_unit" and source.table == "t"
    conn = source.conn
    assert (conn["account"], conn["user"], conn["password"], conn["database"]) == (
        "acme-xy123",
        "etl",
        "s3cret-pw",
        "DB",
    )
    assert (conn["protocol"], conn["port"], conn["warehouse"], conn["schema"]) == ("http", 8080, "WH", "PUBLIC")


def test_bigquery_load_operator_needs_no_ray_stage(monkeypatch):
    """The operator builds the plan and runs the jobs with BigQueryHook's client (faked here)."""
    from types import SimpleNamespace

    from airflow_provider_raydata.hooks import bigquery as bigquery_hooks
    from airflow_provider_raydata.hooks.ray import RayHook
    from airflow_provider_raydata.operators import RayDataLoadOperator
    from tests.helpers import run_operator

    http = FakeBigQueryHttp()
    hook = SimpleNamespace(project_id="my-project", get_client=lambda project_id, location: client(http))
    monkeypatch.setattr(bigquery_hooks, "bigquery_hook", lambda conn_id, location=None: hook)
    monkeypatch.setattr(RayHook, "run_stage", lambda *args, **kwargs: pytest.fail("a BigQuery load ran a Ray stage"))
    op = RayDataLoadOperator(
        task_id="load_bq", input=REF, destination={"kind": "bigquery", "table": "sales.orders"}, mode="overwrite"
    )
    result, ti = run_operator(op)
    assert result["destination"] == "my-project.sales.orders" and result["rows_written"] == 42
    assert ti.xcoms["metrics"]["rows_in"] == 42 and ti.xcoms["metrics"]["rows_out"] == 42
    assert http.posted()[0]["configuration"]["load"]["writeDisposition"] == "WRITE_TRUNCATE"


class FailingBigQueryHttp(FakeBigQueryHttp):
    """Every job ends with BigQuery's ``errorResult`` of the given reason."""

    def __init__(self, reason: str):
        super().__init__()
        self.reason = reason

    def request(self, method, url, data=None, headers=None, timeout=None, **kwargs):
        response = super().request(method, url, data=data, headers=headers, timeout=timeout, **kwargs)
        if method == "POST" and data and "jobReference" in json.loads(data):
            job = {**response.json(), "status": {"state": "DONE", "errorResult": {"reason": self.reason}}}
            return self.respond(200, job)
        return response


@pytest.mark.parametrize(("reason", "retried"), [("invalid", False), ("rateLimitExceeded", True)])
def test_bigquery_data_errors_fail_without_retries_and_rate_limits_retry(monkeypatch, reason, retried):
    from types import SimpleNamespace

    from airflow.sdk.exceptions import AirflowFailException

    from airflow_provider_raydata.hooks import bigquery as bigquery_hooks
    from airflow_provider_raydata.operators import RayDataLoadOperator
    from tests.helpers import run_operator

    http = FailingBigQueryHttp(reason)
    hook = SimpleNamespace(project_id="my-project", get_client=lambda project_id, location: client(http))
    monkeypatch.setattr(bigquery_hooks, "bigquery_hook", lambda conn_id, location=None: hook)
    op = RayDataLoadOperator(
        task_id="load_bq", input=REF, destination={"kind": "bigquery", "table": "sales.orders"}, mode="overwrite"
    )
    with pytest.raises(Exception) as failure:
        run_operator(op)
    assert isinstance(failure.value, AirflowFailException) != retried, repr(failure.value)
    if not retried:
        assert str(failure.value).startswith("load_bq: loading into sales.orders: ")

"""The errors a user sees for bad data: they start with what failed in the user's terms, keep the
original exception's type and message, carry none of Ray Data's retry advice, and fail without
retries when no retry can help (real Ray head, stage service)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from airflow.sdk.exceptions import AirflowFailException

from airflow_provider_raydata.operators import RayDataExtractOperator, RayDataLoadOperator, RayDataTransformOperator
from tests.helpers import run_operator

pytestmark = pytest.mark.integration
RAY_ADVICE = ("retried_io_errors", "DataContext", "Failed to read stream iteratively", "UserCodeException")


@pytest.fixture(scope="module")
def ids(service_for_module, tmp_path_factory):
    root = tmp_path_factory.mktemp("ids")
    pq.write_table(pa.table({"id": list(range(10)), "price": [1.5] * 10}), root / "part-0.parquet")
    operator = RayDataExtractOperator(task_id="ids", source=str(root), staging_uri=str(root / "staging"))
    return run_operator(operator)[0]


def returns_nothing(batch):
    batch["doubled"] = batch["price"] * 2  # and forgets to return the batch


def divides_by_zero(batch):
    batch["share"] = int(batch["price"].iloc[0]) // 0
    return batch


def failure_of(operator) -> str:
    """The task's error after ``Stage failed on <cluster>: ``; it must fail without retries."""
    with pytest.raises(AirflowFailException) as failed:  # no retries: the same data fails again
        run_operator(operator)
    message = str(failed.value)
    assert not any(advice in message for advice in RAY_ADVICE), message
    assert message.startswith("Stage failed on http://"), message
    return message.split(": ", 1)[1]


def test_a_ragged_csv_row_names_the_file_and_the_row(service_for_module, tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("id,price\n1,2.5\n2,3.5,oops\n")
    message = failure_of(RayDataExtractOperator(task_id="x", source=str(path), staging_uri=str(tmp_path / "s")))
    assert message.startswith(f"Cannot parse {path}: CSV parse error: Row #3: Expected 2 columns, got 3"), message


def test_a_corrupt_parquet_file_is_named(service_for_module, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "part-0.parquet").write_bytes(b"PAR1 not really parquet")
    operator = RayDataExtractOperator(task_id="x", source=str(tmp_path / "in"), staging_uri=str(tmp_path / "s"))
    message = failure_of(operator)
    assert message.startswith(f"Corrupt or truncated Parquet file {tmp_path / 'in' / 'part-0.parquet'}: "), message


@pytest.mark.parametrize(
    "fn,expected",
    [
        (returns_nothing, "step 1 (map_batches returns_nothing): the function returned None; return the batch"),
        (
            divides_by_zero,
            "step 1 (map_batches divides_by_zero) raised ZeroDivisionError: integer division or modulo by zero",
        ),
    ],
)
def test_a_function_that_returns_nothing_or_raises_is_named(service_for_module, ids, tmp_path, fn, expected):
    message = failure_of(RayDataTransformOperator(task_id="t", input=ids, fn=fn, staging_uri=str(tmp_path)))
    assert message == expected


def test_a_value_that_overflows_its_column_names_the_column_and_its_precision(service_for_module, ids, pg):
    pg.conn.execute("CREATE TABLE prices (id bigint, price numeric(2, 1))")  # 1.5 fits; 9.99 would not
    pg.conn.execute("ALTER TABLE prices ALTER COLUMN price TYPE numeric(1, 1)")  # now 1.5 does not fit
    destination = {"kind": "postgres", "postgres_conn_id": pg.conn_id, "table": "public.prices"}
    message = failure_of(RayDataLoadOperator(task_id="load", input=ids, destination=destination, mode="append"))
    assert message.startswith("Loading public.prices failed: NumericValueOutOfRange: numeric field overflow ("), message
    assert "precision 1, scale 1" in message and "price" in message, message
    assert pg.conn.execute("SELECT count(*) FROM prices").fetchone()[0] == 0

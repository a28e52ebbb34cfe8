import datetime as dt

import pyarrow as pa
import pytest

from airflow_provider_raydata.runtime.expressions import columns_in, compile_expression


def filter_table(table, expression):
    return table.filter(compile_expression(expression, table.schema))


TABLE = pa.table(
    {
        "day": pa.array([dt.date(2024, 1, 1), dt.date(2024, 1, 2), dt.date(2024, 1, 3)], pa.date32()),
        "status": ["F", "O", None],
        "qty": [5, 12, 30],
        "price": [1.5, None, 3.0],
    }
)


@pytest.mark.parametrize(
    "expression,expected_qty",
    [
        ("day >= '2024-01-02'", [12, 30]),
        ("status == 'F' or qty > 20", [5, 30]),
        ("status in ('F', 'O') and not qty > 10", [5]),
        ("status not in ['F']", [12]),  # null is neither in nor out: filtered away, as in SQL
        ("price is None", [12]),
        ("price is not None", [5, 30]),
        ("10 < qty <= 30", [12, 30]),
        ("qty % 5 == 0 and qty * 2 > 20", [30]),
        ("-qty < -10", [12, 30]),
    ],
)
def test_filters_match_python_semantics(expression, expected_qty):
    assert filter_table(TABLE, expression).column("qty").to_pylist() == expected_qty


def test_unknown_column_is_named_with_the_available_ones():
    with pytest.raises(ValueError, match="Unknown column 'qtty' in expression 'qtty > 1'; available columns: day, "):
        filter_table(TABLE, "qtty > 1")


@pytest.mark.parametrize("expression", ["qty >", "__import__('os').system('true')", "qty if qty else 1"])
def test_bad_or_unsafe_syntax_is_rejected(expression):
    with pytest.raises(ValueError):
        filter_table(TABLE, expression)


def test_columns_in_ignores_literals():
    assert columns_in("a > 1 and b is None and c == True") == {"a", "b", "c"}

"""A user's batch function as a Ray Data step (on the cluster): it gets its batches in the format
it asked for, and what it returns keeps the types the data already had.

pandas and numpy change a column's physical type on the way: a ``decimal128(38, 10)`` comes back
with the precision one batch's values need, an integer column with nulls as float64 (numpy), a
string as large_string, a timestamp in another unit. Such a column is cast back to the type it
came in with. A type the function really changes (a number made text, a decimal made float)
is kept and reported in the task log; ``output_schema`` declares types outright (also for the
columns the function adds), and a value that does not fit a kept or declared type fails the
step, naming the column."""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from ..contracts import DataError
from .types import arrow_type

# Integer and boolean columns reach pandas as nullable dtypes: with nulls they stay integers.
_NULLABLE = {
    pa.int8(): pd.Int8Dtype(),
    pa.int16(): pd.Int16Dtype(),
    pa.int32(): pd.Int32Dtype(),
    pa.int64(): pd.Int64Dtype(),
    pa.uint8(): pd.UInt8Dtype(),
    pa.uint16(): pd.UInt16Dtype(),
    pa.uint32(): pd.UInt32Dtype(),
    pa.uint64(): pd.UInt64Dtype(),
    pa.bool_(): pd.BooleanDtype(),
}


def as_batch(table: pa.Table, batch_format: str) -> Any:
    """``table`` in a user function's batch format: ``pandas``, ``pyarrow`` or ``numpy``."""
    if batch_format == "pyarrow":
        return table
    if batch_format == "numpy" or any(isinstance(t, pa.ExtensionType) for t in table.schema.types):
        from ray.data.block import BlockAccessor  # Ray Data's own conversion: tensor columns as ndarrays

        return BlockAccessor.for_block(table).to_batch_format(batch_format)
    return table.to_pandas(types_mapper=_NULLABLE.get)


def as_table(batch: Any, label: str) -> pa.Table | None:
    """A function's result as an Arrow table (NaN in numpy floats is a null, as pandas has it);
    None for what only Ray Data itself converts (multi-dimensional arrays)."""
    if isinstance(batch, pa.Table):
        return batch
    if isinstance(batch, pd.DataFrame):
        return pa.Table.from_pandas(batch, preserve_index=False)
    if isinstance(batch, Mapping):
        arrays = {name: np.asarray(values) for name, values in batch.items()}
        if any(values.ndim != 1 for values in arrays.values()):
            return None
        return pa.table({name: pa.array(values, from_pandas=True) for name, values in arrays.items()})
    kind = type(batch).__name__
    raise DataError(
        f"{label}: the function must return a pandas DataFrame, a pyarrow Table or a dict of arrays, not {kind}"
    )


def conform(
    result: pa.Table, before: pa.Schema, declared: Mapping[str, pa.DataType], label: str, batch_format: str
) -> pa.Table:
    """``result`` with each column in its declared type, else in the type it came in with when
    only its physical form changed on the way (``restores``)."""
    fields = []
    for field in result.schema:
        target = declared.get(field.name)
        if target is None and field.name in before.names:
            came_in = before.field(field.name).type
            target = came_in if restores(came_in, field.type, batch_format) else None
        if target is None and pa.types.is_large_string(field.type):
            target = pa.string()  # pandas' text as Arrow's usual string, as sources give it
        fields.append(field if target is None else field.with_type(target))
    wanted = pa.schema(fields)
    if wanted.equals(result.schema):
        return result
    columns = []
    for field, column in zip(wanted, result.columns, strict=True):
        if column.type == field.type:
            columns.append(column)
            continue
        try:
            columns.append(column.cast(field.type))  # safe: fails rather than truncate or overflow
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            was = "declared as" if field.name in declared else "was"
            new = "string" if _text(column.type) else column.type
            raise DataError(
                f"{label}: column {field.name!r} {was} {field.type}, and the function returned {new} "
                f"values that do not fit it ({exc}); declare its new type with output_schema="
                f"{{{field.name!r}: '{new}'}}"
            ) from None
    return pa.Table.from_arrays(columns, schema=wanted)


def restores(came_in: pa.DataType, returned: pa.DataType, batch_format: str) -> bool:
    """Whether ``returned`` is ``came_in`` changed only in form by the batch format's round trip."""
    kinds = (pa.types.is_decimal, pa.types.is_timestamp, _text, pa.types.is_date, pa.types.is_time)
    if pa.types.is_null(returned) or pa.types.is_dictionary(returned):
        return True  # a batch of nulls only; a categorical of the same values
    if any(kind(came_in) and kind(returned) for kind in kinds):
        return True
    if pa.types.is_integer(came_in):  # numpy has no integer with nulls: float64 with NaN
        return pa.types.is_integer(returned) or (batch_format == "numpy" and pa.types.is_floating(returned))
    return pa.types.is_floating(came_in) and pa.types.is_floating(returned)


def _text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def step_label(label: str, fn: Any) -> str:
    """``step 1 (map_batches net_revenue)`` for ``step 1 (map_batches)``: the function named."""
    return label.replace("(map_batches)", f"(map_batches {getattr(fn, '__name__', fn)})")


def is_async(fn: Any) -> bool:
    """A coroutine or async-generator function (or callable class): Ray Data runs it its own way,
    with the batch format it asked for, and its results as they are."""
    target = fn.__call__ if isinstance(fn, type) else fn
    return inspect.iscoroutinefunction(target) or inspect.isasyncgenfunction(target)


def typed_batches(fn: Any, batch_format: str, output_schema: Mapping[str, str] | None, label: str) -> Any:
    """``fn`` (a function or a callable class) as a step that takes pyarrow batches: it gets them
    as ``batch_format`` and its results are conformed (``conform``). Generator functions get the
    same; async functions are left as they are (``is_async``)."""
    declared = {name: arrow_type(type_name) for name, type_name in (output_schema or {}).items()}

    def result_of(batch: Any, before: pa.Schema) -> Any:
        if batch is None:
            raise DataError(f"{label}: the function returned None; return the batch")
        table = as_table(batch, label)
        return batch if table is None else conform(table, before, declared, label, batch_format)

    if is_async(fn):
        return fn
    target = fn.__call__ if isinstance(fn, type) else fn
    if inspect.isgeneratorfunction(target):

        def call(target: Callable, table: pa.Table, *args: Any, **kwargs: Any) -> Any:
            with raised_on_the_data(label):
                for batch in target(as_batch(table, batch_format), *args, **kwargs):
                    yield result_of(batch, table.schema)

    else:

        def call(target: Callable, table: pa.Table, *args: Any, **kwargs: Any) -> Any:
            with raised_on_the_data(label):
                result = target(as_batch(table, batch_format), *args, **kwargs)
            return result_of(result, table.schema)

    return around(fn, call)


class UserFunctionError(DataError):
    """A batch function raised on the data: the same batch would raise again, so no retry."""


# What a function raises on the data it is given (a bad value, a missing column, a division by
# zero): the same batch raises again. Anything else it raises (a lost connection, a timeout, an
# HTTP client's error, memory) is retried by Airflow.
ON_THE_DATA = (ValueError, TypeError, KeyError, IndexError, AttributeError, ArithmeticError, AssertionError)


@contextlib.contextmanager
def raised_on_the_data(label: str) -> Iterator[None]:
    """A function's exception about its data as a ``UserFunctionError`` keeping its type and message."""
    try:
        yield
    except DataError:
        raise
    except ON_THE_DATA as exc:
        raise UserFunctionError(f"{label} raised {type(exc).__name__}: {exc}") from exc


def around(fn: Any, call: Callable[..., Any]) -> Any:
    """``fn`` (a function or a callable class) with each call made as ``call(fn's callable, *args)``;
    the result keeps ``fn``'s name (Ray Data names its operator after it) and kind."""
    if isinstance(fn, type):
        if inspect.isgeneratorfunction(fn.__call__):

            class Wrapped(fn):
                def __call__(self, *args: Any, **kwargs: Any) -> Any:
                    yield from call(super().__call__, *args, **kwargs)

        else:

            class Wrapped(fn):
                def __call__(self, *args: Any, **kwargs: Any) -> Any:
                    return call(super().__call__, *args, **kwargs)

        Wrapped.__name__ = Wrapped.__qualname__ = fn.__name__
        return Wrapped
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator(*args: Any, **kwargs: Any) -> Any:
            yield from call(fn, *args, **kwargs)

        return generator

    @functools.wraps(fn)
    def function(*args: Any, **kwargs: Any) -> Any:
        return call(fn, *args, **kwargs)

    return function

"""A user's batch function as a Ray Data step (on the cluster): it gets its batches in the format
it asked for, and what it returns keeps the types the data already had.

pandas infers types from values: a ``decimal128(38, 10)`` column comes back as whatever precision
one batch's values need, an integer column with nulls as float64. A column the function leaves
alone, or fills with values that fit its type, is cast back to the type it came in with; a
column whose values no longer fit fails the step unless ``output_schema`` declares its new type
(which also fixes the types of the columns the function adds)."""

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
    if batch_format == "numpy":
        return {name: column.to_numpy() for name, column in zip(table.column_names, table.columns, strict=True)}
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


def conform(result: pa.Table, before: pa.Schema, declared: Mapping[str, pa.DataType], label: str) -> pa.Table:
    """``result`` with each column in its declared type, else the type it had in ``before``."""
    fields = []
    for field in result.schema:
        target = declared.get(field.name)
        if target is None and field.name in before.names:
            target = before.field(field.name).type
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


def _text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def step_label(label: str, fn: Any) -> str:
    """``step 1 (map_batches net_revenue)`` for ``step 1 (map_batches)``: the function named."""
    return label.replace("(map_batches)", f"(map_batches {getattr(fn, '__name__', fn)})")


def typed_batches(fn: Any, batch_format: str, output_schema: Mapping[str, str] | None, label: str) -> Any:
    """``fn`` (a function or a callable class) as a step that takes pyarrow batches: it gets them
    as ``batch_format`` and its results are conformed (``conform``). Generator functions get the
    same; coroutine functions are left as they are (Ray Data runs them its own way)."""
    declared = {name: arrow_type(type_name) for name, type_name in (output_schema or {}).items()}

    def result_of(batch: Any, before: pa.Schema) -> Any:
        if batch is None:
            raise DataError(f"{label}: the function returned None; return the batch")
        table = as_table(batch, label)
        return batch if table is None else conform(table, before, declared, label)

    target = fn.__call__ if isinstance(fn, type) else fn
    if inspect.iscoroutinefunction(target) or inspect.isasyncgenfunction(target):
        return fn
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


@contextlib.contextmanager
def raised_on_the_data(label: str) -> Iterator[None]:
    """A function's exception as a ``UserFunctionError`` that keeps its type and message; an
    OSError (a lost connection, a timeout in a call the function makes) stays retryable."""
    try:
        yield
    except (OSError, DataError):
        raise
    except Exception as exc:
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

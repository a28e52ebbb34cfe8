"""Arrow type names as users write them in cast specs ("float64", "decimal128(15, 2)", ...): at DAG
parse time and on the cluster."""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.compute as pc

from ..contracts import DataError

_DECIMAL = re.compile(r"decimal(?:128)?\((\d+),\s*(\d+)\)")
_TIMESTAMP = re.compile(r"timestamp\[(s|ms|us|ns)(?:,\s*tz=([^\]]+))?\]")


def arrow_type(name: str) -> pa.DataType:
    text = name.strip().lower()
    if match := _DECIMAL.fullmatch(text):
        return pa.decimal128(int(match[1]), int(match[2]))
    if match := _TIMESTAMP.fullmatch(text):
        return pa.timestamp(match[1], tz=match[2].upper() if match[2] == "utc" else match[2])
    try:
        return pa.type_for_alias(text)
    except ValueError:
        raise DataError(f"Unknown Arrow type {name!r}") from None


def cast_columns(table: pa.Table, casts: dict[str, str]) -> pa.Table:
    """Cast the named columns; string_view columns become string (pyarrow 26 cannot filter them)."""
    fields = []
    for field in table.schema:
        if field.name in casts:
            field = field.with_type(arrow_type(casts[field.name]))
        elif pa.types.is_string_view(field.type):
            field = field.with_type(pa.string())
        fields.append(field)
    target = pa.schema(fields)
    return table if target.equals(table.schema) else table.cast(target)


def check_columns(wanted, available, label: str) -> None:
    missing = [c for c in wanted if c not in available]
    if missing:
        raise DataError(f"Unknown column {missing[0]!r} in {label}; available columns: {', '.join(available)}")


def repeated_key(table: pa.Table, keys: list[str]) -> str | None:
    """The error for an upsert without ``sequence_by`` whose rows repeat a key (which row would
    win?), naming one such key; None when every key is unique."""
    counts = table.group_by(keys).aggregate([([], "count_all")])
    repeated = counts.filter(pc.greater(counts["count_all"], 1)).slice(0, 1).to_pylist()
    if not repeated:
        return None
    named = ", ".join(f"{k}={repeated[0][k]!r}" for k in keys)
    return f"upsert: key ({named}) appears more than once in this load; set sequence_by to keep the latest"


def type_class(type_name: str) -> str:
    """``number``, ``string``, ``time``, ``bool`` or ``other`` for an Arrow type name (``str(type)``)."""
    name = type_name.strip().lower()
    if name.startswith(("int", "uint", "float", "double", "halffloat", "decimal")):
        return "number"
    if name in ("string", "large_string", "string_view", "utf8", "large_utf8"):
        return "string"
    if name.startswith(("date", "timestamp")):
        return "time"
    return "bool" if name in ("bool", "boolean") else "other"

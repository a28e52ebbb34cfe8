"""The runtime's Ray Data settings (``tuning=`` on every operator): their defaults, and the check
of a user's overrides at DAG parse time. Imports neither Airflow nor Ray."""

from __future__ import annotations

from typing import Any

from ..contracts import DataError

DEFAULT_TUNING = {
    # Each read_parquet otherwise starts 32 footer-reading actors: seconds of fixed cost per read.
    "parquet_footer_actors": 1,
    # Sort-based shuffles run as tasks; the hash shuffle starts aggregator actors (seconds each time).
    "shuffle_strategy": "sort_shuffle_pull_based",
    # Plain numpy-backed pandas batches: with pandas 3 Arrow-backed batches simple arithmetic
    # such as ``df["id"] % 10`` raises NotImplementedError.
    "arrow_backed_pandas": False,
    "min_rows_per_file": 1_000_000,
    # The V2 Parquet reader starts footer-reading actors on every read: 3-7 s per read measured
    # here against 0.2 s for the V1 reader on small inputs.
    "parquet_reader_v2": False,
}
SHUFFLE_STRATEGIES = ("sort_shuffle_pull_based", "sort_shuffle_push_based", "hash_shuffle")


def validate_tuning(tuning: dict[str, Any] | None) -> None:
    """Unknown keys and values of the wrong kind fail here, naming the key, not on the cluster."""
    for key, value in (tuning or {}).items():
        if key not in DEFAULT_TUNING:
            raise DataError(f"Unknown tuning key {key!r}; known keys: {', '.join(DEFAULT_TUNING)}")
        expected = type(DEFAULT_TUNING[key])
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise DataError(f"tuning {key!r} must be {expected.__name__}, not {value!r}")
        if key == "shuffle_strategy" and value not in SHUFFLE_STRATEGIES:
            raise DataError(f"tuning 'shuffle_strategy' must be one of {', '.join(SHUFFLE_STRATEGIES)}")

"""The per-batch partial metrics and their merge, against pandas on the same data."""

import pickle

import numpy as np
import pandas as pd
import pyarrow as pa

from airflow_provider_raydata.runtime.checks import evaluate, partial_metrics

CHECKS = [
    {"check": "row_count", "min": 10},
    {"check": "not_null", "column": "price"},
    {"check": "unique", "columns": ["id"]},
    {"check": "unique", "columns": ["id", "kind"]},
    {"check": "range", "column": "price", "min": 0, "max": 100},
    {"check": "accepted_values", "column": "kind", "values": ["a", "b"]},
    {"check": "regex", "column": "email", "pattern": "^[^@]+@[^@]+$"},
]


def planted_defects() -> pd.DataFrame:
    rng = np.random.default_rng(3)
    frame = pd.DataFrame(
        {
            "id": np.arange(200),
            "kind": rng.choice(["a", "b"], 200),
            "price": rng.uniform(0, 100, 200),
            "email": [f"user{i}@example.com" for i in range(200)],
        }
    )
    frame.loc[[5, 17, 90], "price"] = None  # 3 nulls
    frame.loc[40, "price"] = 150.0  # out of range
    frame.loc[[7, 8], "kind"] = "z"  # 2 unaccepted values
    frame.loc[[11], "email"] = "not-an-email"  # 1 regex failure
    frame.loc[199, "id"] = 0  # one duplicate id (kind may differ)
    return frame


def run(frame: pd.DataFrame) -> list[dict]:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    batches = [table.slice(0, 70), table.slice(70, 70), table.slice(140)]  # merged across batches
    parts = [pickle.loads(partial_metrics(b, CHECKS)["parts"][0]) for b in batches]

    def exact(keys):
        return int(frame.duplicated(keys).sum())

    return [evaluate(c, [p[i] for p in parts], len(frame), exact) for i, c in enumerate(CHECKS)]


def test_each_check_measures_what_pandas_measures():
    frame = planted_defects()
    results = run(frame)
    by_name = {r["name"]: r for r in results}
    assert by_name["row_count"]["value"] == 200 and by_name["row_count"]["passed"]
    assert by_name["not_null(price)"]["value"] == frame["price"].isna().sum() == 3
    assert by_name["range(price)"]["value"] == {"min": frame["price"].min(), "max": 150.0}
    assert not by_name["range(price)"]["passed"]
    assert by_name["accepted_values(kind)"]["value"] == 2
    assert by_name["accepted_values(kind)"]["examples"] == ["z"]
    assert by_name["regex(email)"]["value"] == 1 and by_name["regex(email)"]["examples"] == ["not-an-email"]
    assert by_name["unique(id)"]["value"] == 1 and not by_name["unique(id)"]["passed"]
    composite_dupes = frame.duplicated(["id", "kind"]).sum()
    assert by_name["unique(id,kind)"]["value"] == composite_dupes


def test_clean_data_passes():
    frame = planted_defects().iloc[20:190]
    frame = frame[frame["price"].notna() & (frame["price"] <= 100) & frame["kind"].isin(["a", "b"])]
    frame = frame[frame["email"].str.contains("@")]
    results = run(frame)
    assert all(r["passed"] for r in results), [r for r in results if not r["passed"]]


def test_two_phase_aggregate_matches_pandas():
    from airflow_provider_raydata.runtime.transforms import merge_partials, partial_aggregate

    frame = planted_defects()
    aggs = [
        ("total", "sum", "price"),
        ("n", "count", None),
        ("avg", "mean", "price"),
        ("kinds", "count_distinct", "kind"),
        ("low", "min", "price"),
        ("high", "max", "price"),
    ]
    table = pa.Table.from_pandas(frame.assign(bucket=frame["id"] % 4), preserve_index=False)
    partials = pa.concat_tables([partial_aggregate(table.slice(i, 50), ["bucket"], aggs) for i in range(0, 200, 50)])
    got = merge_partials(partials, ["bucket"], aggs).to_pandas().set_index("bucket").sort_index()
    expected = (
        frame.assign(bucket=frame["id"] % 4)
        .groupby("bucket")
        .agg(
            total=("price", "sum"),
            n=("id", "size"),
            avg=("price", "mean"),
            kinds=("kind", "nunique"),
            low=("price", "min"),
            high=("price", "max"),
        )
    )
    pd.testing.assert_frame_equal(got, expected, check_dtype=False, check_names=False)

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_provider_raydata.contracts import DatasetRef, ProducedBy
from airflow_provider_raydata.runtime import paths, refs


def test_task_prefix_makes_run_ids_path_safe():
    prefix = paths.task_prefix("s3://bucket/stage/", "daily", "scheduled__2024-01-02T00:00:00+00:00", "load")
    assert prefix == "s3://bucket/stage/daily/scheduled__2024-01-02T00_00_00_00_00/load"


def write_attempt(prefix: str, try_number: int, rows: int) -> str:
    uri = refs.new_attempt_uri(prefix, try_number)
    os.makedirs(uri)
    pq.write_table(pa.table({"id": list(range(rows))}), f"{uri}/part-0.parquet")
    return uri


def test_commit_describes_the_data_and_replaces_older_attempts(tmp_path):
    prefix = str(tmp_path / "dag" / "run" / "task")
    first = write_attempt(prefix, 1, 3)
    refs.commit(first, None, ProducedBy(try_number=1))
    second = write_attempt(prefix, 2, 5)
    ref = refs.commit(second, None, ProducedBy(try_number=2)).to_dict()
    assert ref["num_rows"] == 5 and ref["num_files"] == 1 and ref["schema"] == {"id": "int64"}
    assert not os.path.exists(first)
    assert refs.resolve(DatasetRef(second), None).to_dict() == ref
    assert json.loads(json.dumps(ref)) == ref  # XCom-safe


def test_an_attempt_without_marker_is_never_read(tmp_path):
    uri = write_attempt(str(tmp_path / "t"), 1, 2)
    with pytest.raises(FileNotFoundError, match="is not committed"):
        refs.resolve(DatasetRef.parse({"uri": uri}), None)
    with pytest.raises(FileNotFoundError, match="Input dataset not found"):
        refs.resolve(DatasetRef.parse(str(tmp_path / "missing")), None)
    with pytest.raises(ValueError, match="Not a dataset reference"):
        refs.resolve(DatasetRef.parse({"path": uri}), None)


def test_the_runtime_imports_without_airflow():
    """The cluster may not have Airflow: block it and import every runtime module (and the contracts)."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['airflow'] = None\n"
        "import importlib, pkgutil, airflow_provider_raydata.runtime as rt, airflow_provider_raydata.contracts\n"
        "found = [m.name for m in pkgutil.walk_packages(rt.__path__, f'{rt.__name__}.')]\n"
        "assert 'airflow_provider_raydata.runtime.postgres.upsert' in found, found  # subpackages too\n"
        "for name in found: importlib.import_module(name)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "ok", result.stderr[-2000:]

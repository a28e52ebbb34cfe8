"""Staging retention on a local staging tree: ages set with os.utime, no Ray."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from airflow_provider_raydata.contracts import CleanupEntry
from airflow_provider_raydata.runtime import retention
from airflow_provider_raydata.runtime.paths import safe_segment


def clean_staging(*args, **kwargs) -> dict:
    """The summary as XCom shows it."""
    return retention.clean_staging(*args, **kwargs).to_dict()


DAY = 86400
DAG = "daily"
OLD_RUN = "scheduled__2024-01-01T00:00:00+00:00"
NEW_RUN = "scheduled__2024-01-09T00:00:00+00:00"


def age(path: Path, days: float) -> None:
    """Set the mtime of a file or of every file and directory below a directory."""
    stamp = time.time() - days * DAY
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        os.utime(p, (stamp, stamp))


def attempt(root: Path, dag: str, run: str, task: str, days: float, committed: bool = True, sub: str = "") -> Path:
    """An attempt directory as a stage writes it; committed with a ``_SUCCESS`` reference."""
    path = root / safe_segment(dag) / safe_segment(run) / task / sub / f"attempt-1-{os.urandom(4).hex()}"
    path.mkdir(parents=True)
    (path / "part-0.parquet").write_bytes(b"x" * 100)
    if committed:
        ref = {"uri": str(path), "produced_by": {"dag_id": dag, "run_id": run, "task_id": task, "try_number": 1}}
        (path / "_SUCCESS").write_text(json.dumps(ref))
    age(path, days)
    return path


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def staging(tmp_path) -> Path:
    root = tmp_path / "staging"
    root.mkdir()
    return root


def test_old_run_removed_recent_run_kept(staging):
    old = attempt(staging, DAG, OLD_RUN, "extract", days=10)
    attempt(staging, DAG, OLD_RUN, "quality", days=9, sub="quarantine")
    new = attempt(staging, DAG, NEW_RUN, "extract", days=1)

    summary = clean_staging(str(staging), None, 7, active_runs=[])

    assert not old.parent.parent.exists() and new.exists()
    [removed] = summary["removed"]
    assert removed["kind"] == "run" and removed["path"] == str(old.parent.parent)
    assert (removed["dag_id"], removed["run_id"]) == (DAG, OLD_RUN)  # the real ids, from _SUCCESS
    assert (removed["files"], summary["files_removed"]) == (4, 4)
    assert summary["bytes_removed"] == removed["bytes"] > 200
    assert summary["counts"] == {"run": 1} and summary["recent_runs"] == 1 and summary["errors"] == []


def test_a_run_is_as_young_as_its_newest_file(staging):
    old = attempt(staging, DAG, OLD_RUN, "extract", days=30)
    attempt(staging, DAG, OLD_RUN, "load", days=2)  # a task cleared and rerun two days ago
    clean_staging(str(staging), None, 7, active_runs=[])
    assert old.exists()


def test_active_run_kept_even_when_old(staging):
    committed = attempt(staging, DAG, OLD_RUN, "extract", days=10)
    # Nothing committed: matched on the directory names of the escaped ids.
    uncommitted_run = "manual__2024-01-02T10:00:00+00:00"
    killed = attempt(staging, DAG, uncommitted_run, "extract", days=10, committed=False)

    summary = clean_staging(str(staging), None, 7, active_runs=[[DAG, OLD_RUN], [DAG, uncommitted_run]])

    assert committed.exists()
    assert sorted((e["run_id"] or "", e["reason"]) for e in summary["kept"]) == [("", "active"), (OLD_RUN, "active")]
    # The killed attempt itself is dead either way (no reader uses an uncommitted attempt).
    assert not killed.exists() and [e["kind"] for e in summary["removed"]] == ["attempt"]


def test_active_run_ids_are_matched_unescaped(staging):
    # ':' and '+' are escaped in directory names; an active run is given by its real ids.
    committed = attempt(staging, DAG, "manual__a:b", "extract", days=10)
    clean_staging(str(staging), None, 7, active_runs=[[DAG, "manual__a:b"]])
    assert committed.exists()
    clean_staging(str(staging), None, 7, active_runs=[[DAG, "other"], ["other_dag", "manual__a:b"]])
    assert not committed.exists()


def test_uncommitted_attempts_removed_by_their_own_age(staging):
    committed = attempt(staging, DAG, NEW_RUN, "extract", days=1)
    killed = attempt(staging, DAG, NEW_RUN, "extract", days=8, committed=False)
    killed_quarantine = attempt(staging, DAG, NEW_RUN, "quality", days=8, committed=False, sub="quarantine")
    running = attempt(staging, DAG, NEW_RUN, "transform", days=0, committed=False)  # a stage writing now

    summary = clean_staging(str(staging), None, 7, active_runs=[])

    assert committed.exists() and running.exists()
    assert not killed.exists() and not killed_quarantine.exists()
    assert summary["counts"] == {"attempt": 2}
    assert {e["path"] for e in summary["removed"]} == {str(killed), str(killed_quarantine)}


def test_lake_staging_leftovers_removed(tmp_path, staging):
    lake = tmp_path / "lake" / "orders"
    data = lake / "day=2024-01-01" / "abc_0.parquet"
    data.parent.mkdir(parents=True)
    data.write_bytes(b"data")
    leftover = lake / "_staging" / "abc-1234abcd" / "day=2024-01-01"
    leftover.mkdir(parents=True)
    (leftover / "abc_0.parquet").write_bytes(b"x" * 10)
    loading = lake / "_staging" / "def-5678abcd"  # a load writing right now
    loading.mkdir()
    (loading / "def_0.parquet").write_bytes(b"x")
    age(lake, 10)
    age(loading, 0)

    summary = clean_staging(str(staging), None, 7, active_runs=[], lake_paths=[str(lake)])

    assert not leftover.parent.exists() and loading.exists() and data.exists()
    assert [(e["kind"], e["path"]) for e in summary["removed"]] == [("lake_staging", str(leftover.parent))]


def test_nothing_outside_the_root_is_touched(tmp_path, staging):
    attempt(staging, DAG, OLD_RUN, "extract", days=30)
    sibling = tmp_path / "staging2" / DAG / "run" / "task" / "attempt-1-0000"  # shares the root's prefix
    sibling.mkdir(parents=True)
    (sibling / "part.parquet").write_bytes(b"x")
    age(tmp_path / "staging2", 30)
    (staging / "README").write_text("not a run")  # files above the run level
    (staging / DAG / "notes.txt").write_text("not a run")
    foreign = staging / "projects" / "report"  # a run-shaped directory with files of its own
    (foreign / "task").mkdir(parents=True)
    (foreign / "task" / "data.csv").write_text("a,b")
    age(staging, 30)
    before = tree(tmp_path)

    summary = clean_staging(str(staging), None, 7, active_runs=[])

    removed = {str(Path(e["path"]).relative_to(staging)) for e in summary["removed"]}
    assert removed == {f"{DAG}/{safe_segment(OLD_RUN)}"}
    assert before - tree(tmp_path) == {f for f in before if f.startswith(f"staging/{DAG}/{safe_segment(OLD_RUN)}/")}
    assert [e["reason"] for e in summary["kept"]] == ["foreign files (not a staging run)"]


def test_refuses_a_filesystem_root():
    with pytest.raises(ValueError, match="dedicated"):
        clean_staging("/", None, 7, active_runs=[])


def test_dry_run_deletes_nothing(tmp_path, staging):
    attempt(staging, DAG, OLD_RUN, "extract", days=10)
    attempt(staging, DAG, NEW_RUN, "extract", days=1)
    attempt(staging, DAG, NEW_RUN, "extract", days=8, committed=False)
    before = tree(staging)

    dry = clean_staging(str(staging), None, 7, active_runs=[], dry_run=True)

    assert tree(staging) == before
    assert dry["counts"] == {"run": 1, "attempt": 1} and dry["dry_run"] is True
    real = clean_staging(str(staging), None, 7, active_runs=[], now=dry["now"])
    assert [e["path"] for e in real["removed"]] == [e["path"] for e in dry["removed"]]


def test_candidates_limit_run_removal_to_checked_runs(staging):
    checked = attempt(staging, DAG, OLD_RUN, "extract", days=10)
    unchecked = attempt(staging, DAG, "scheduled__2024-01-02T00:00:00+00:00", "extract", days=10)

    summary = clean_staging(str(staging), None, 7, [], candidates=[f"{DAG}/{checked.parent.parent.name}"])

    assert not checked.exists() and unchecked.exists()
    assert [e["reason"] for e in summary["kept"]] == ["not checked against Airflow"]


# --- the Airflow side: which candidates are active -------------------------------------------


class DagRuns:
    """A stand-in for ``get_dr_count`` over a fixed set of (dag_id, run_id, state)."""

    def __init__(self, runs: list[tuple[str, str, str]]):
        self.runs, self.calls = runs, 0

    def count(self, dag_id: str, run_ids: list[str] | None = None, states: list[str] | None = None, **_) -> int:
        self.calls += 1
        return sum(
            d == dag_id and (not run_ids or r in run_ids) and (not states or s in states) for d, r, s in self.runs
        )


def candidate(dag_id: str, run_id: str | None, run_dir: str = "dir") -> CleanupEntry:
    return CleanupEntry("run", f"/staging/{dag_id}/{run_dir}", 1, 1, None, f"{dag_id}/{run_dir}", dag_id, run_id)


def test_find_active_runs():
    from airflow_provider_raydata.run_context import find_active_runs

    runs = DagRuns([("a", "r1", "running"), ("a", "r2", "success"), ("b", "r3", "queued"), ("c", "x", "failed")])
    candidates = [candidate("a", "r1"), candidate("a", "r2"), candidate("a", None, "killed"), candidate("c", "x")]
    candidates += [candidate("c", None, "killed")]
    assert find_active_runs(candidates, runs.count) == [["a", "r1"], ["a", "killed"]]
    quiet = DagRuns([("a", "r1", "success")])
    assert find_active_runs([candidate("a", f"r{i}") for i in range(500)], quiet.count) == []
    assert quiet.calls == 1  # one count per DAG without active runs, whatever its candidates


def test_cleanup_operator_two_stages(staging, monkeypatch):
    """The operator's flow with the stage run in-process (what Ray would run, without Ray)."""
    from airflow_provider_raydata.contracts import StageSpec, from_plain, to_plain
    from airflow_provider_raydata.operators import RayDataStagingCleanupOperator
    from airflow_provider_raydata.runtime.runner import run_stage
    from tests.helpers import FakeTaskInstance

    active = attempt(staging, DAG, OLD_RUN, "extract", days=10)
    finished = attempt(staging, DAG, "scheduled__2024-01-02T00:00:00+00:00", "extract", days=10)
    specs = []

    def fake_run_stage(spec, timeout=None):
        specs.append(to_plain(spec.cleanup))
        return run_stage(from_plain(StageSpec, to_plain(spec, secrets=True)))  # plain data, as over the wire

    operator = RayDataStagingCleanupOperator(task_id="clean", staging_uri=str(staging), retention_days="7")
    settings = SimpleNamespace(dashboard_url=None, label="in-process", storage_options={}, embedded=True)
    monkeypatch.setitem(
        operator.__dict__,
        "hook",
        SimpleNamespace(run_stage=fake_run_stage, settings=settings, dashboard_link=lambda: ""),
    )
    ti = FakeTaskInstance(dag_id="maintenance", task_id="clean")
    ti.get_dr_count = DagRuns([(DAG, OLD_RUN, "running")]).count

    summary = operator.execute({"ti": ti})  # the summary as XCom shows it

    assert active.exists() and not finished.exists()
    assert [s["dry_run"] for s in specs] == [True, False]
    assert specs[1]["active_runs"] == [[DAG, OLD_RUN]] and specs[1]["now"] == summary["now"]
    assert summary["counts"] == {"run": 1} and [e["reason"] for e in summary["kept"]] == ["active"]
    assert ti.xcoms["metrics"]["rows_out"] is None

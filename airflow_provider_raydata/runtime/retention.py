"""Staging retention (on the cluster): remove old stage outputs, never those of runs still active.

The staging area holds ``{root}/{dag}/{run}/{task}/attempt-{try}-{token}/`` directories (and
``{task}/quarantine/attempt-.../``), committed by a ``_SUCCESS`` marker (``refs.py``). A run
directory is removed when its newest file is older than the cutoff and the run is not active;
an uncommitted attempt (a killed stage) is removed by its own age even in a kept run, since no
reader ever uses it. Lake loads leave ``{lake}/_staging/{load_id}-{token}/`` behind when killed;
those go by age too. Ages come from file modification times of one recursive listing per root.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow.fs as pafs

from ..contracts import CleanupEntry, CleanupSummary, DataError, DatasetRef
from .lake import STAGING_DIR
from .paths import safe_segment
from .refs import ATTEMPT_PREFIX, QUARANTINE_DIR, SUCCESS
from .storage import filesystem_for

THREADS = 16  # marker reads and deletes are one or two requests each on object stores


@dataclass
class _Unit:
    """A directory that is removed as a whole: a run, an attempt or a lake staging directory."""

    path: str
    files: int = 0
    size: int = 0
    newest: float | None = None  # newest file mtime (epoch seconds)
    newest_dir: float | None = None  # for directories without files (local filesystems)
    unknown_age: bool = False  # a file without mtime: never old
    markers: list[str] = field(default_factory=list)
    foreign: bool = False  # files outside attempt directories: not our layout, never touched
    attempts: dict[str, _Unit] = field(default_factory=dict)

    def add(self, info: pafs.FileInfo) -> None:
        seconds = None if info.mtime_ns is None else info.mtime_ns / 1e9
        if info.type == pafs.FileType.Directory:
            if seconds is not None:
                self.newest_dir = seconds if self.newest_dir is None else max(self.newest_dir, seconds)
            return
        self.files += 1
        self.size += info.size or 0
        if seconds is None:
            self.unknown_age = True
        else:
            self.newest = seconds if self.newest is None else max(self.newest, seconds)

    def older_than(self, cutoff: float) -> bool:
        if self.unknown_age:
            return False
        newest = self.newest if self.files else self.newest_dir
        return newest is None or newest < cutoff


def clean_staging(
    staging_uri: str,
    storage: dict | None,
    older_than_days: float,
    active_runs: Iterable[Collection[str]],
    now: datetime | str | None = None,
    dry_run: bool = False,
    lake_paths: Iterable[str] = (),
    candidates: Collection[str] | None = None,
) -> CleanupSummary:
    """Remove staging directories whose newest file is older than ``older_than_days``.

    ``active_runs``: ``[dag_id, run_id]`` pairs whose run directories are kept at any age;
    they match the real ids in a run's ``_SUCCESS`` markers or its (escaped) directory names,
    which is all a run without a committed output has. ``candidates``: when given, only these
    run directories (``"dag/run"`` relative to the root, as listed by an earlier dry run whose
    runs were checked) may be removed. ``lake_paths``: lake destinations whose ``_staging``
    leftovers are removed by age. Returns a summary: what was removed (or would be, with
    ``dry_run``) and which old runs were kept, with counts, files and bytes.
    """
    if older_than_days < 0:
        raise DataError(f"older_than_days must not be negative, got {older_than_days}")
    when = _as_datetime(now)
    cutoff = (when - timedelta(days=older_than_days)).timestamp()
    active = {(str(d), str(r)) for d, r in active_runs}
    active_dirs = {(safe_segment(d), safe_segment(r)) for d, r in active}
    kept: list[CleanupEntry] = []
    recent_runs = 0
    fs, root = filesystem_for(staging_uri, storage)
    _check_root(root, staging_uri)
    runs = _list_runs(fs, root)
    old = {key: run for key, run in runs.items() if not run.foreign and run.older_than(cutoff)}
    producers = _read_producers(fs, old)
    removals: list[tuple[CleanupEntry, str, pafs.FileSystem]] = []  # (entry, path in fs, fs)
    for key, run in sorted(runs.items()):
        rel = "/".join(key)
        ids = producers.get(key)
        if run.foreign:
            kept.append(_entry("run", staging_uri, root, run, reason="foreign files (not a staging run)"))
            continue
        if key in old:
            # dag_id/run_id: the real ids for the caller to check (run_id None: nothing committed)
            dag_id, run_id = ids or (key[0], None)
            entry = _entry("run", staging_uri, root, run, run=rel, dag_id=dag_id, run_id=run_id)
            if ids in active or key in active_dirs:
                kept.append(replace(entry, reason="active"))
            elif candidates is not None and rel not in candidates:
                kept.append(replace(entry, reason="not checked against Airflow"))
            else:
                removals.append((entry, run.path, fs))
                continue
        else:
            recent_runs += 1
        for attempt in run.attempts.values():
            if not attempt.markers and attempt.older_than(cutoff):
                removals.append((_entry("attempt", staging_uri, root, attempt, run=rel), attempt.path, fs))
    for lake in lake_paths:
        removals += _lake_leftovers(lake, storage, cutoff)
    removed, errors = _remove(removals, dry_run)
    return CleanupSummary(
        staging_uri=staging_uri,
        now=when.isoformat(),
        cutoff=datetime.fromtimestamp(cutoff, UTC).isoformat(),
        older_than_days=older_than_days,
        dry_run=dry_run,
        removed=tuple(removed),
        kept=tuple(kept),
        recent_runs=recent_runs,
        errors=tuple(errors),
    )


def _as_datetime(now: datetime | str | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    when = datetime.fromisoformat(now) if isinstance(now, str) else now
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _check_root(root: str, uri: str) -> None:
    # A filesystem root would make every two-level directory on the machine a "run".
    if root in ("", "/"):
        raise DataError(f"Refusing to clean {uri!r}: the staging URI must be a dedicated directory or prefix")


def _list_runs(fs: pafs.FileSystem, root: str) -> dict[tuple[str, str], _Unit]:
    """Run directories with their attempts, from one recursive listing of the staging root."""
    runs: dict[tuple[str, str], _Unit] = {}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        parts = info.path[len(root) :].strip("/").split("/")
        if len(parts) < 2 or (len(parts) == 2 and info.type != pafs.FileType.Directory):
            continue  # DAG directories and stray files above the run level: not ours
        key = (parts[0], parts[1])
        run = runs.setdefault(key, _Unit(f"{root}/{parts[0]}/{parts[1]}"))
        run.add(info)
        depth = _attempt_depth(parts)
        is_file = info.type != pafs.FileType.Directory
        if depth is None or (is_file and len(parts) == depth):
            run.foreign |= is_file
            continue
        attempt_path = "/".join([root, *parts[:depth]])
        attempt = run.attempts.setdefault(attempt_path, _Unit(attempt_path))
        attempt.add(info)
        if is_file and len(parts) == depth + 1 and parts[-1] == SUCCESS:
            attempt.markers.append(info.path)
            run.markers.append(info.path)
    return runs


def _attempt_depth(parts: list[str]) -> int | None:
    """How many path parts name the attempt directory of an entry (None: not in an attempt)."""
    if len(parts) > 3 and parts[3].startswith(ATTEMPT_PREFIX):
        return 4  # dag/run/task/attempt-*
    if len(parts) > 4 and parts[3] == QUARANTINE_DIR and parts[4].startswith(ATTEMPT_PREFIX):
        return 5  # dag/run/task/quarantine/attempt-*
    return None


def _read_producers(fs: pafs.FileSystem, runs: dict[tuple[str, str], _Unit]) -> dict[tuple[str, str], tuple[str, str]]:
    """The real (dag_id, run_id) of each run from one of its ``_SUCCESS`` markers, when it has one."""

    def read(run: _Unit) -> tuple[str, str] | None:
        for marker in run.markers:
            try:
                with fs.open_input_stream(marker) as handle:
                    produced_by = DatasetRef.from_dict(json.loads(handle.read())).produced_by
            except (OSError, ValueError, TypeError, AttributeError):
                continue  # vanished or unreadable: try another marker, else the directory names
            if produced_by.dag_id and produced_by.run_id:
                return produced_by.dag_id, produced_by.run_id
        return None

    with ThreadPoolExecutor(THREADS) as pool:
        found = dict(zip(runs, pool.map(read, runs.values()), strict=True))
    return {key: ids for key, ids in found.items() if ids}


def _lake_leftovers(lake: str, storage: dict | None, cutoff: float) -> list[tuple[CleanupEntry, str, pafs.FileSystem]]:
    """Old ``{lake}/_staging/*`` directories (killed loads); one listing per lake path."""
    fs, base = filesystem_for(lake, storage)
    _check_root(base, lake)
    root = f"{base}/{STAGING_DIR}"
    units: dict[str, _Unit] = {}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        parts = info.path[len(root) :].strip("/").split("/")
        if len(parts) == 1 and info.type != pafs.FileType.Directory:
            continue  # a stray file directly in _staging: not a load's directory
        units.setdefault(parts[0], _Unit(f"{root}/{parts[0]}")).add(info)
    uri_root = f"{lake.rstrip('/')}/{STAGING_DIR}"
    return [
        (_entry("lake_staging", uri_root, root, unit), unit.path, fs)
        for _, unit in sorted(units.items())
        if unit.older_than(cutoff)
    ]


def _entry(kind: str, uri_root: str, root: str, unit: _Unit, **extra: Any) -> CleanupEntry:
    newest = unit.newest if unit.files else unit.newest_dir
    return CleanupEntry(
        kind=kind,
        path=uri_root.rstrip("/") + unit.path[len(root) :],
        files=unit.files,
        bytes=unit.size,
        newest=None if newest is None else datetime.fromtimestamp(newest, UTC).isoformat(),
        **extra,
    )


def _remove(
    removals: list[tuple[CleanupEntry, str, pafs.FileSystem]], dry_run: bool
) -> tuple[list[CleanupEntry], list[tuple[str, str]]]:
    """Delete the directories (in parallel; none with ``dry_run``): what went, and (path, error) pairs."""

    def remove(path: str, fs: pafs.FileSystem) -> str | None:
        try:
            fs.delete_dir(path)
        except FileNotFoundError:
            pass  # gone meanwhile (a concurrent cleanup, or a commit dropping an older attempt)
        except OSError as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    outcomes: list[str | None] = [None] * len(removals)
    if not dry_run:
        with ThreadPoolExecutor(THREADS) as pool:
            outcomes = list(pool.map(remove, [path for _, path, _ in removals], [fs for _, _, fs in removals]))
    removed = [entry for (entry, _, _), error in zip(removals, outcomes, strict=True) if not error]
    errors = [(entry.path, error) for (entry, _, _), error in zip(removals, outcomes, strict=True) if error]
    return removed, errors

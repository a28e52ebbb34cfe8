"""A stage's own log lines, kept in its ``StageProcess`` (on the cluster) for the Airflow task to
read by offset while the stage runs: our progress messages, Ray Data's (it logs the plan, each
operator's progress and the execution stats in the process that runs the dataset) and whatever
the stage's process prints. Each line keeps its level, so the task log shows Ray's informational
lines as INFO, not as ERROR lines read from stderr."""

from __future__ import annotations

import io
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

MAX_LINES = 20_000  # per stage; later lines are dropped
# Loggers whose records reach the stage log: Ray Data does not propagate to the root logger.
LOGGERS = ("", "ray.data")
# What Ray itself writes to a worker's stdout to mark tasks for its log monitor.
RAY_MARKERS = (":actor_name:", ":task_name:", ":job_id:", ":event_summary:", ":info_message:")

log = logging.getLogger("airflow_provider_raydata.stage")
# (stage id, executor) of the stage this process runs: its map functions' prints go there.
forward_prints_to: tuple[str, Any] | None = None


class StageLog(logging.Handler):
    """The lines of the stage this process runs, handed on in batches by ``take``."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.lock_ = threading.Lock()
        self.stage_id = ""
        self.pending: list[dict[str, Any]] = []
        self.count = 0  # lines of this stage so far: the offset of the next one

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
        except Exception:  # noqa: BLE001 - a broken log call must not break the stage
            message = str(record.msg)
        self.add(record.levelname, message, record.name, record.created)

    def add(self, level: str, message: str, source: str, created: float | None = None) -> None:
        with self.lock_:
            if self.count < MAX_LINES:
                line = {"time": created or time.time(), "level": level, "source": source, "message": message}
                self.pending.append(line)
                self.count += 1

    def start(self, stage_id: str) -> None:
        with self.lock_:
            self.stage_id, self.pending, self.count = stage_id, [], 0

    def take(self) -> tuple[str, int, list[dict[str, Any]]]:
        """(stage id, offset of the first line, lines) not handed on yet."""
        with self.lock_:
            lines, self.pending = self.pending, []
            return self.stage_id, self.count - len(lines), lines


class StageLines:
    """A stage's lines as its readers see them, on the executor: the stage process's batches in
    their order (they may arrive out of order: the executor is a threaded actor) and the prints
    of the stage's map tasks as they come."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []
        self.early: dict[int, list[dict[str, Any]]] = {}  # stage-process batches ahead of a missing one
        self.next_own = 0  # offset, in the stage process's numbering, of its next line

    def add_own(self, start: int, lines: list[dict[str, Any]]) -> None:
        self.early[start] = lines
        while self.next_own in self.early:
            batch = self.early.pop(self.next_own)
            self.lines += batch
            self.next_own += len(batch)

    def add_prints(self, lines: list[dict[str, Any]]) -> None:
        self.lines += lines[: max(MAX_LINES - len(self.lines), 0)]

    def read(self, offset: int) -> tuple[list[dict[str, Any]], int]:
        """Lines from ``offset`` on, and the offset after them."""
        lines = self.lines[offset:]
        return lines, offset + len(lines)


class _Lines(io.TextIOBase):
    """A stdout or stderr that writes on to where it wrote before and hands each complete line
    (not a blank one, nor one of Ray's task markers) to ``keep``."""

    def __init__(self, original: Any, keep: Callable[[str], None], skip_log_copies: bool = False) -> None:
        self.original, self.keep, self.skip_log_copies, self.pending = original, keep, skip_log_copies, ""

    def write(self, text: str) -> int:
        self.original.write(text)
        if self.skip_log_copies and sys._getframe(1).f_globals.get("__name__") == "logging":
            return len(text)  # a log handler's copy of a record the stage log already has
        self.pending += text
        *complete, self.pending = self.pending.split("\n")
        for line in complete:
            if line.strip() and not line.startswith(RAY_MARKERS):
                self.keep(line)
        return len(text)

    def flush(self) -> None:
        self.original.flush()


def forwarding_prints(fn: Any, stage_id: str, executor: Any) -> Any:
    """``fn`` (a batch function, or a callable class for an actor pool) whose prints while it runs
    in a map task reach the stage's log on ``executor``: those tasks run in other processes than
    the stage's own, where ``install`` does not reach."""
    import inspect

    import ray

    from .batches import around

    def call(target: Any, *args: Any, **kwargs: Any) -> Any:
        lines: list[dict[str, Any]] = []
        stdout = sys.stdout = _Lines(
            sys.stdout,
            lambda line: lines.append({"time": time.time(), "level": "INFO", "source": "print", "message": line}),
        )
        try:
            return target(*args, **kwargs)
        finally:
            sys.stdout = stdout.original
            if stdout.pending.strip():
                stdout.write("\n")
            if lines:  # waited for: the lines are in before the stage's result
                ray.get(executor.add_prints.remote(stage_id, lines))

    target = fn.__call__ if isinstance(fn, type) else fn
    lazy = (inspect.isgeneratorfunction, inspect.iscoroutinefunction, inspect.isasyncgenfunction)
    if any(kind(target) for kind in lazy):
        return fn  # its batches are made outside any call we could wrap (and Ray Data looks at its kind)
    return around(fn, call)


def install() -> StageLog:
    """Route this process's logging and prints into a ``StageLog`` (once per process)."""
    handler = StageLog()
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        if name == "":
            logger.setLevel(min(logger.level or logging.INFO, logging.INFO))
    log.setLevel(logging.INFO)
    sys.stdout = _Lines(sys.stdout, lambda line: handler.add("INFO", line, "print"), skip_log_copies=True)
    sys.stderr = _Lines(sys.stderr, lambda line: handler.add("WARNING", line, "print"), skip_log_copies=True)
    return handler

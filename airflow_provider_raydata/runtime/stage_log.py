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
from typing import Any

MAX_LINES = 20_000  # per stage; later lines are dropped
# Loggers whose records reach the stage log: Ray Data does not propagate to the root logger.
LOGGERS = ("", "ray.data")
# What Ray itself writes to a worker's stdout to mark tasks for its log monitor.
RAY_MARKERS = (":actor_name:", ":task_name:", ":job_id:", ":event_summary:", ":info_message:")

log = logging.getLogger("airflow_provider_raydata.stage")


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


def add_lines(kept: list[dict[str, Any] | None], start: int, lines: list[dict[str, Any]]) -> None:
    """Put a batch at its offset: batches may arrive out of order (a threaded actor)."""
    if len(kept) < start:
        kept.extend([None] * (start - len(kept)))
    kept[start : start + len(lines)] = lines


def read_lines(kept: list[dict[str, Any] | None], offset: int) -> tuple[list[dict[str, Any]], int]:
    """Lines from ``offset`` up to the first one still missing, and the offset after them."""
    lines = []
    for line in kept[offset:]:
        if line is None:
            break
        lines.append(line)
    return lines, offset + len(lines)


class _Stream(io.TextIOBase):
    """stdout/stderr of the stage process: each complete line to the stage log, and on to the
    worker's own log file as before."""

    def __init__(self, handler: StageLog, level: str, original: Any) -> None:
        self.handler, self.level, self.original, self.pending = handler, level, original, ""

    def write(self, text: str) -> int:
        self.original.write(text)
        if sys._getframe(1).f_globals.get("__name__") == "logging":  # a log handler's copy: already kept
            return len(text)
        self.pending += text
        *complete, self.pending = self.pending.split("\n")
        for line in complete:
            if line.strip() and not line.startswith(RAY_MARKERS):
                self.handler.add(self.level, line, "print")
        return len(text)

    def flush(self) -> None:
        self.original.flush()


def install() -> StageLog:
    """Route this process's logging and prints into a ``StageLog`` (once per process)."""
    handler = StageLog()
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        if name == "":
            logger.setLevel(min(logger.level or logging.INFO, logging.INFO))
    log.setLevel(logging.INFO)
    sys.stdout = _Stream(handler, "INFO", sys.stdout)
    sys.stderr = _Stream(handler, "WARNING", sys.stderr)
    return handler

"""Where a task's staged data lives: plain string functions, imported by the operators at DAG
parse time (they need no pyarrow there)."""

from __future__ import annotations

import re


def join_uri(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def safe_segment(value: str) -> str:
    """Make a run id or task id safe as one path segment (run ids contain ':' and '+')."""
    return re.sub(r"[^A-Za-z0-9._=-]", "_", value)


def task_prefix(staging_uri: str, dag_id: str, run_id: str, task_id: str) -> str:
    return join_uri(staging_uri, safe_segment(dag_id), safe_segment(run_id), safe_segment(task_id))

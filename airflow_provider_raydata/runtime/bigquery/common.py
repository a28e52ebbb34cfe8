"""Shared by the BigQuery modules (cluster and worker): validated, quoted names and clients from
an access token."""

from __future__ import annotations

import re
from typing import Any

from ...contracts import DataError

STAGING_PREFIX = "_raydata_"


_PROJECT = re.compile(r"(?:[a-z0-9.-]+:)?[a-z][a-z0-9-]{4,28}[a-z0-9]")


_DATASET = re.compile(r"\w{1,1024}", re.ASCII)


_TABLE = re.compile(r"[\w\- ]{1,1024}")  # letters, marks, numbers, connectors, dashes, spaces


def table_parts(name: str | dict, default_project: str | None = None) -> tuple[str, str, str]:
    """``"project.dataset.table"``, ``"dataset.table"`` or a dict -> validated (project, dataset, table)."""
    if isinstance(name, dict):
        parts = [name.get("project") or default_project, name.get("dataset"), name.get("table")]
    else:
        parts = name.split(".") if isinstance(name, str) else []
        parts = [default_project, *parts] if len(parts) == 2 else parts
    if len(parts) != 3:
        raise DataError(f"Invalid BigQuery table {name!r}: use 'project.dataset.table' or 'dataset.table'")
    project, dataset, table = parts
    for part, pattern, what in (
        (project, _PROJECT, "project"),
        (dataset, _DATASET, "dataset"),
        (table, _TABLE, "table"),
    ):
        if not isinstance(part, str) or not pattern.fullmatch(part):
            raise DataError(f"Invalid BigQuery {what} name {part!r} in table {name!r}")
    return project, dataset, table


def quote(name: str) -> str:
    """A backtick-quoted BigQuery identifier (backslashes and backticks escaped)."""
    if not isinstance(name, str) or not name or "\n" in name:
        raise DataError(f"Invalid BigQuery identifier {name!r}")
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def quoted_table(project: str, dataset: str, table: str) -> str:
    return ".".join(quote(p) for p in (project, dataset, table))


def clients(conn: dict[str, Any]):
    from google.cloud import bigquery
    from google.oauth2.credentials import Credentials

    return bigquery.Client(project=conn["project"], credentials=Credentials(conn["token"]))


def _read_client(token: str):
    from google.cloud import bigquery_storage
    from google.oauth2.credentials import Credentials

    return bigquery_storage.BigQueryReadClient(credentials=Credentials(token))

"""Text for the task log: quality reports, cleanup summaries, long lists (Airflow worker).
Imports no Airflow."""

from __future__ import annotations

from typing import Any

from airflow_provider_raydata.contracts import CheckResult, CleanupSummary

LOGGED_PATHS = 50  # paths listed in the task log (and in the cleanup's returned summary: 2x)


def format_report(report: dict[str, Any]) -> str:
    """The report as a table for the task log."""
    rows = [("check", "value", "expected", "policy", "result")]
    for c in report["checks"]:
        value = f"{c['value']:.6g}" if isinstance(c["value"], float) else str(c["value"])
        if c.get("note"):
            value = c["note"] if c["value"] is None else f"{value} ({c['note']})"
        if c.get("failed_rows"):
            value += f" ({c['failed_rows']} of {c['evaluated_rows']} rows failed)"
        result = "PASS" if c["passed"] else ("FAIL" if c.get("policy", "fail") == "fail" else "WARN")
        rows.append((_cell(c["name"]), _cell(value), _cell(c["expected"]), c.get("policy", "fail"), result))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    if "rows_in" in report:
        lines.append(
            f"rows in {report['rows_in']} = passed {report['rows_passed']} + quarantined "
            f"{report['rows_quarantined']}; quality score {report['score']:.4f}"
        )
    return "\n".join(lines)


def _cell(text: str, width: int = 70) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def describe(check: CheckResult) -> str:
    text = f"got {check.value}, expected {check.expected}"
    if check.details.get("examples"):
        text += f" (e.g. {check.details['examples']})"
    return text


def listed(names: list[str], most: int = 10) -> str:
    """A list for the task log: a bulk load may replace thousands of partitions."""
    if len(names) <= most:
        return ", ".join(names) or "-"
    return f"{len(names)}: {', '.join(names[: most // 2])}, ..., {', '.join(names[-most // 2 :])}"


def format_cleanup(summary: CleanupSummary, tables: dict[str, list[str]]) -> str:
    """The cleanup summary for the task log."""
    verb = "Would remove" if summary.dry_run else "Removed"
    active = [e for e in summary.kept if e.reason == "active"]
    lines = [
        f"Staging retention on {summary.staging_uri} (older than {summary.older_than_days} days, before "
        f"{summary.cutoff}): {verb.lower()} {summary.count('run')} runs, {summary.count('attempt')} "
        f"uncommitted attempts, {summary.count('lake_staging')} lake staging directories "
        f"({summary.files_removed} files, {summary.bytes_removed / 1e6:.1f} MB); kept {len(active)} old "
        f"runs that are active, {len(summary.kept) - len(active)} other old runs, "
        f"{summary.recent_runs} recent runs",
    ]
    lines += [f"  {verb} {e.kind} {e.path} (newest file {e.newest})" for e in summary.removed[:LOGGED_PATHS]]
    lines += [f"  Kept {e.path}: {e.reason}" for e in summary.kept[:LOGGED_PATHS]]
    for conn_id, names in tables.items():
        lines.append(
            f"PostgreSQL {conn_id}: {'would drop' if summary.dry_run else 'dropped'} {len(names)} "
            f"orphaned staging tables{': ' + ', '.join(names) if names else ''}"
        )
    return "\n".join(lines)

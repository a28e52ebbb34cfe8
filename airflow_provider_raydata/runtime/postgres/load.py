"""A PostgreSQL load held for its task's word (on the cluster): staged and published in one
transaction that is left open until the Airflow task, holding the stage's result, commits it
through the stage executor. If the task dies first, the transaction ends with the stage's
process (the retry supersedes it, or the executor's wait runs out) and PostgreSQL rolls it back:
the target is exactly as it was. Staging tables of failed loads are dropped; the retry drops
those of killed ones (same load id)."""

from __future__ import annotations

from collections.abc import Callable

from ...contracts import Destination, LoadResult
from .common import connect, drop_staging_tables, explained
from .publish import publish
from .staging import copy_to_staging

# Keepalives: a backend whose stage process vanished with its node ends its transaction too.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}
# A held load's transaction outlives the stage executor's commit wait (120 s) by this bound at most.
IDLE_IN_TRANSACTION_SECONDS = 180


def load_held(
    uri: str, storage: dict | None, destination: Destination, load_id: str
) -> tuple[LoadResult, Callable[[bool], None]]:
    """Stage and publish a load in one transaction that is left open: ``commit(True)`` commits it,
    ``commit(False)`` rolls it back; so does the end of this process (PostgreSQL rolls back the
    transaction of a closed connection). The Airflow task asks for the commit only once it holds
    the result: a task killed before that leaves the target exactly as it was."""
    # Opened first: short-lived credentials (e.g. RDS IAM tokens) may expire during a long COPY.
    conn = connect({**destination.conn, **KEEPALIVES})  # not autocommit: statements open a transaction
    plan = None
    try:
        plan = copy_to_staging(uri, storage, destination, load_id)
        # PostgreSQL itself ends the transaction if no commit comes (held locks stay bounded).
        conn.execute(f"SET LOCAL idle_in_transaction_session_timeout = '{IDLE_IN_TRANSACTION_SECONDS}s'")
        result = publish(conn, plan, storage)
    except BaseException as exc:
        conn.close()
        if plan and plan.staging_table:  # the rolled-back load's staged rows
            try:
                with connect(destination.conn) as cleanup, cleanup.cursor() as cur:
                    drop_staging_tables(cur, plan.schema, load_id)
            except Exception:  # noqa: S110 - the retry drops them; the load's own error matters
                pass
        error = explained(exc, destination.table if isinstance(destination.table, str) else str(destination.table))
        if error is exc:
            raise
        raise error from exc

    def commit(commit: bool) -> None:
        try:
            conn.commit() if commit else conn.rollback()
        finally:
            conn.close()

    return result, commit

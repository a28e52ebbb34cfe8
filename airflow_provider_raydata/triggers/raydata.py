"""RayDataStageTrigger (triggerer): waits for a stage on the stage service while its task is
deferred, with an async HTTP client only, so the triggerer's event loop never blocks. Streams the
stage's log lines into the task log, commits a load held open on the cluster (so its
transaction holds no lock while the task waits for a worker slot), and cancels the stage when a
user kills the task (``on_kill``, Airflow 3.3+)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowException
from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_raydata.hooks.stage_service import (
    FINAL_STATES,
    REQUEST_TIMEOUT,
    check_response,
    log_stage_lines,
    ssl_context,
    unreachable,
)

# Consecutive failed polls (the service restarting, a network blip) before the task is told.
MAX_POLL_FAILURES = 10
# A trigger that fires within seconds of its task's deferral can race the scheduler, which then
# fails the resumed task on the stale "success" of the deferring process (apache/airflow#66374,
# #67287, #72716; Airflow 3.3 covers it only while the task is still "scheduled"): the event waits
# until this long after the deferral. A loaded scheduler here took 7 s to see the deferring exit.
SETTLE_SECONDS = 10.0


class RayDataStageTrigger(BaseTrigger):
    """Fires once the stage ``stage_id`` has ended (or its ``deadline``, a UNIX time, has passed:
    then the stage is cancelled first). The event says how; the task's ``execute_complete``
    reads the result itself."""

    def __init__(
        self,
        raydata_conn_id: str,
        stage_id: str,
        deadline: float | None = None,
        poll_interval: float = 2.0,
        log_offset: int = 0,
        deferred_at: float | None = None,
    ) -> None:
        super().__init__()
        self.raydata_conn_id = raydata_conn_id
        self.stage_id = stage_id
        self.deadline = deadline
        self.poll_interval = poll_interval
        self.log_offset = log_offset  # lines the task logged before it deferred
        self.deferred_at = deferred_at  # UNIX time

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__name__}",
            {
                "raydata_conn_id": self.raydata_conn_id,
                "stage_id": self.stage_id,
                "deadline": self.deadline,
                "poll_interval": self.poll_interval,
                "log_offset": self.log_offset,
                "deferred_at": self.deferred_at,
            },
        )

    async def client(self) -> tuple[httpx.AsyncClient, str]:
        from airflow_provider_raydata.hooks.ray import settings_from_connection

        if hasattr(BaseHook, "aget_connection"):
            conn = await BaseHook.aget_connection(self.raydata_conn_id)
        else:  # Airflow 3.1/3.2
            conn = await asyncio.to_thread(BaseHook.get_connection, self.raydata_conn_id)
        settings = settings_from_connection(conn.host, conn.port, conn.password, conn.extra_dejson)
        if not settings.service_url:
            raise AirflowException(f"Connection {self.raydata_conn_id!r} names no stage service (http(s)://...)")
        headers = {"Authorization": f"Bearer {settings.auth_token}"} if settings.auth_token else {}
        verify = await asyncio.to_thread(ssl_context)  # built once per triggerer, off the event loop
        http = httpx.AsyncClient(base_url=settings.service_url, headers=headers, timeout=REQUEST_TIMEOUT, verify=verify)
        return http, settings.service_url

    async def call(self, http: httpx.AsyncClient, url: str, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = await http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise unreachable(url, exc) from None
        return check_response(response, url, f"{method} {path}")

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            http, url = await self.client()
        except Exception as exc:  # noqa: BLE001 - told to the task, which fails (and may retry)
            yield self.event("error", message=str(exc))
            return
        base = f"/v1/stages/{self.stage_id}"
        offset, failures = self.log_offset, 0
        async with http:
            while True:
                try:
                    # Answered when the stage ends, or after poll_interval: no sleep between reads.
                    params = {"offset": offset, "wait": self.poll_interval}
                    page = await self.call(http, url, "GET", f"{base}/logs", params=params)
                    failures = 0
                except AirflowException as exc:
                    failures += 1
                    if "unreachable" not in str(exc) or failures >= MAX_POLL_FAILURES:
                        yield self.event("error", message=str(exc))
                        return
                    self.log.warning("Polling stage %s failed (%d): %s", self.stage_id, failures, exc)
                    await asyncio.sleep(self.poll_interval)
                    continue
                log_stage_lines(self.log, page["lines"])
                offset = page["next_offset"]
                state = page["state"]
                if state == "held":  # a PostgreSQL load published in an open transaction: commit it now
                    state = (await self.call(http, url, "POST", f"{base}/commit", json={"commit": True}))["state"]
                if state in FINAL_STATES:
                    final = await self.call(http, url, "GET", f"{base}/logs", params={"offset": offset})
                    log_stage_lines(self.log, final["lines"])
                    if self.deferred_at is not None:
                        await asyncio.sleep(max(self.deferred_at + SETTLE_SECONDS - time.time(), 0))
                    yield self.event("done", state=state)
                    return
                if self.deadline is not None and time.time() > self.deadline:
                    await self.call(http, url, "POST", f"{base}/cancel")
                    yield self.event("timeout")
                    return

    def event(self, status: str, **fields: Any) -> TriggerEvent:
        return TriggerEvent({"status": status, "stage_id": self.stage_id, **fields})

    async def on_kill(self) -> None:
        """The user marked the deferred task failed or cleared it: stop its stage (Airflow 3.3+).
        Older Airflow does not call this; see the README on deferrable operators."""
        http, url = await self.client()
        async with http:
            view = await self.call(http, url, "POST", f"/v1/stages/{self.stage_id}/cancel")
        self.log.warning("Cancelled stage %s (%s)", self.stage_id, "stopped" if view.get("cancelled") else "ended")

"""The stage service's HTTP API (on the cluster, in the service job's driver; aiohttp ships with
``ray[default]``). Airflow tasks reach the stage executor through it with one HTTP round trip
instead of a Ray Client session, and deferred tasks poll it from the triggerer.

Every call needs ``Authorization: Bearer <token>``; the service knows only the token's SHA-256
(its command line, which the dashboard shows, carries no secret). Without one it only listens
on a loopback address. Routes (JSON in and out; ``{"error": ...}`` with a 4xx names a problem)::

    GET  /v1/health                    service and Ray versions, protocol, stages running
    POST /v1/stages                    {"spec": <wire spec>, "lease_seconds": n} -> the stage
                                       (idempotent by stage_id; with a lease, a running stage
                                       nobody asks about for n seconds is cancelled)
    GET  /v1/stages/{id}               state, timings, result or error
    GET  /v1/stages/{id}/logs?offset=  its log lines from offset on, and the next offset
    POST /v1/stages/{id}/cancel        stop it (or roll back a held load)
    POST /v1/stages/{id}/commit        {"commit": true|false}: publish or roll back a held load
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import platform
import re
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .. import __version__
from ..contracts import PROTOCOL, DataError, StageSpec
from ..wire import decode_spec, encode_result
from .errors import describe_failure

log = logging.getLogger("airflow_provider_raydata.service")

DEFAULT_PORT = 8477
MAX_REQUEST_BYTES = 32 * 1024 * 1024  # a spec with a user function pickled by value
MAX_LOG_WAIT_SECONDS = 10.0  # a log read waits at most this long for its stage to end
KEPT_STAGES = 2000  # finished stages the service still answers for
STAGE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
FINAL = frozenset({"succeeded", "failed", "cancelled", "rolled_back"})


@dataclass
class Stage:
    stage_id: str
    name: str
    stage: str
    state: str = "running"  # -> held | succeeded | failed | cancelled | rolled_back
    submitted: float = field(default_factory=time.time)
    finished: float | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    cancelling: bool = False
    dashboard_path: str | None = None  # its task's page in the dashboard, once it started
    lease_seconds: float | None = None  # cancelled when nobody asked about it for this long
    last_seen: float = field(default_factory=time.monotonic)  # the end of the last request about it
    asking: int = 0  # requests about it in progress (a status can wait on a busy executor)
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # left "running"

    def view(self) -> dict[str, Any]:
        end = self.finished or time.time()
        return {
            "stage_id": self.stage_id,
            "name": self.name,
            "stage": self.stage,
            "state": self.state,
            "submitted": self.submitted,
            "finished": self.finished,
            "elapsed": round(end - self.submitted, 3),
            "result": self.result,
            "error": self.error,
            "dashboard_path": self.dashboard_path,
        }


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class StageService:
    """The routes above, over one ``StageExecutor`` actor handle."""

    def __init__(self, executor: Any, token_sha256: str | None) -> None:
        self.executor = executor
        self.token_sha256 = token_sha256
        self.stages: OrderedDict[str, Stage] = OrderedDict()
        self.tasks: set[asyncio.Task] = set()
        self.max_request_bytes = MAX_REQUEST_BYTES

    def app(self, max_request_bytes: int = MAX_REQUEST_BYTES) -> web.Application:
        self.max_request_bytes = max_request_bytes
        app = web.Application(client_max_size=max_request_bytes, middlewares=[self.errors, self.authenticate])
        app.add_routes(
            [
                web.get("/v1/health", self.health),
                web.post("/v1/stages", self.submit),
                web.get("/v1/stages/{stage_id}", self.status),
                web.get("/v1/stages/{stage_id}/logs", self.logs),
                web.post("/v1/stages/{stage_id}/cancel", self.cancel),
                web.post("/v1/stages/{stage_id}/commit", self.commit),
            ]
        )
        return app

    # --- middlewares -------------------------------------------------------------------------

    @web.middleware
    async def errors(self, request: web.Request, handler) -> web.StreamResponse:
        """Every failure as JSON that names the problem; the service keeps serving."""
        try:
            return await handler(request)
        except RequestError as exc:
            return _error(exc.status, str(exc))
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"request body larger than the service's limit of {self.max_request_bytes} bytes")
        except web.HTTPNotFound:
            return _error(404, f"no route {request.method} {request.path}")
        except web.HTTPMethodNotAllowed:
            return _error(405, f"{request.method} is not allowed on {request.path}")
        except web.HTTPException as exc:
            return _error(exc.status, exc.reason)
        except Exception as exc:  # noqa: BLE001 - answered, logged, and the next request is served
            log.exception("%s %s failed", request.method, request.path)
            return _error(500, f"{type(exc).__name__}: {exc}")

    @web.middleware
    async def authenticate(self, request: web.Request, handler) -> web.StreamResponse:
        if self.token_sha256:
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            digest = hashlib.sha256(token.encode()).hexdigest()
            if scheme.lower() != "bearer" or not hmac.compare_digest(digest, self.token_sha256):
                return _error(401, "missing or wrong bearer token")
        return await handler(request)

    # --- routes ------------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        import ray

        running = sum(1 for stage in self.stages.values() if stage.state == "running")
        return web.json_response(
            {
                "service": "airflow-provider-raydata",
                "version": __version__,
                "protocol": PROTOCOL,
                "ray_version": ray.__version__,
                "python": platform.python_version(),
                "running": running,
            }
        )

    async def submit(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        if not isinstance(body.get("spec"), dict):
            raise RequestError(400, 'the body needs "spec": a stage spec object')
        try:
            spec = decode_spec(body["spec"])
        except (DataError, TypeError) as exc:
            raise RequestError(400, f"invalid stage spec: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - e.g. a function pickled for another Python
            raise RequestError(400, f"invalid stage spec: {type(exc).__name__}: {exc}") from None
        if not STAGE_ID.match(spec.stage_id):
            raise RequestError(400, "stage_id must be 1-128 letters, digits, '_', '.' or '-'")
        lease = body.get("lease_seconds")
        if lease is not None and (isinstance(lease, bool) or not isinstance(lease, (int, float)) or lease <= 0):
            raise RequestError(400, f"lease_seconds must be a positive number of seconds, got {lease!r}")
        existing = self.stages.get(spec.stage_id)
        if existing is not None:  # a repeated submit (a retried request): the same stage
            return web.json_response(existing.view())
        stage = Stage(spec.stage_id, spec.name, spec.stage, lease_seconds=lease)
        self.stages[spec.stage_id] = stage
        self._forget_old()
        for work in (self._run(stage, spec), *((self._expire(stage),) if lease else ())):
            task = asyncio.get_running_loop().create_task(work)
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        log.info("stage %s (%s, %s) submitted", stage.stage_id, stage.name, stage.stage)
        return web.json_response(stage.view(), status=201)

    async def status(self, request: web.Request) -> web.Response:
        stage = self._stage(request)
        view = stage.view()
        if stage.state == "running":
            with self._asking(stage):
                progress = await self.executor.progress.remote(stage.stage_id)
            view["rows_read"], view["bytes_read"] = progress["rows_read"], progress["bytes_read"]
            view["progress"] = progress["datasets"]
        return web.json_response(view)

    async def logs(self, request: web.Request) -> web.Response:
        stage = self._stage(request)
        try:
            offset = int(request.query.get("offset", "0"))
        except ValueError:
            raise RequestError(400, f"offset must be an integer, got {request.query['offset']!r}") from None
        try:
            wait = min(float(request.query.get("wait", "0")), MAX_LOG_WAIT_SECONDS)
        except ValueError:
            raise RequestError(400, f"wait must be a number of seconds, got {request.query['wait']!r}") from None
        with self._asking(stage):
            if wait > 0 and stage.state == "running":
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stage.ended.wait(), wait)
            lines, next_offset, stage.dashboard_path = await self.executor.logs.remote(stage.stage_id, max(offset, 0))
        body = {
            "lines": lines,
            "next_offset": next_offset,
            "state": stage.state,
            "dashboard_path": stage.dashboard_path,
        }
        return web.json_response(body)

    async def cancel(self, request: web.Request) -> web.Response:
        stage = self._stage(request)
        if stage.state in FINAL:
            return web.json_response({**stage.view(), "cancelled": False})
        stage.cancelling = True
        stopped = await self.executor.cancel.remote(stage.stage_id)
        if stage.state in ("running", "held"):
            self._finish(stage, "cancelled")
        log.info("stage %s cancelled (%s)", stage.stage_id, "stopped" if stopped else "already ended")
        return web.json_response({**stage.view(), "cancelled": bool(stopped)})

    async def commit(self, request: web.Request) -> web.Response:
        stage = self._stage(request)
        body = await _json_body(request)
        commit = body.get("commit", True)
        if not isinstance(commit, bool):
            raise RequestError(400, '"commit" must be true or false')
        wanted = "succeeded" if commit else "rolled_back"
        if stage.state == wanted:  # a repeated call (the triggerer restarted): already done
            return web.json_response({**stage.view(), "done": True})
        if stage.state != "held":
            raise RequestError(409, f"stage {stage.stage_id} holds no load to commit (state {stage.state})")
        try:
            done = await self.executor.commit.remote(stage.stage_id, commit)
        except Exception as exc:  # noqa: BLE001 - the COMMIT itself failed: nothing published
            stage.error = describe_failure(exc)
            self._finish(stage, "failed")
            return web.json_response({**stage.view(), "done": False})
        self._finish(stage, wanted if done else "rolled_back")
        return web.json_response({**stage.view(), "done": bool(done)})

    # --- helpers -----------------------------------------------------------------------------

    async def _run(self, stage: Stage, spec: StageSpec) -> None:
        try:
            result = await self.executor.run.remote(spec)
        except Exception as exc:  # noqa: BLE001 - reported through status
            if stage.cancelling:
                self._finish(stage, "cancelled")
            else:
                stage.error = describe_failure(exc)
                self._finish(stage, "failed")
            log.info("stage %s %s", stage.stage_id, stage.state)
            return
        stage.result = encode_result(result)
        if stage.state == "running":
            if result.held:
                stage.state = "held"
                stage.ended.set()
            else:
                self._finish(stage, "succeeded")
        log.info("stage %s %s", stage.stage_id, stage.state)

    async def _expire(self, stage: Stage) -> None:
        """Cancel the stage once nobody asked about it for its lease: its Airflow task is gone (its
        worker died, or it was marked failed while deferred, before any triggerer polled it)."""
        while stage.state == "running":
            idle = time.monotonic() - stage.last_seen
            if idle < stage.lease_seconds or stage.asking:
                await asyncio.sleep(min(max(stage.lease_seconds - idle, 0.5), 5.0))
                continue
            stage.cancelling = True
            stage.error = {
                "message": f"cancelled: nothing asked about it for {stage.lease_seconds:g}s (its lease)",
                "data_error": False,
            }
            await self.executor.cancel.remote(stage.stage_id)
            if stage.state == "running":
                self._finish(stage, "cancelled")
            log.warning("stage %s cancelled: no request about it for %gs", stage.stage_id, stage.lease_seconds)

    @contextlib.contextmanager
    def _asking(self, stage: Stage) -> Iterator[None]:
        """A request about ``stage`` in progress: its lease does not run out meanwhile."""
        stage.asking += 1
        try:
            yield
        finally:
            stage.asking -= 1
            stage.last_seen = time.monotonic()

    def _finish(self, stage: Stage, state: str) -> None:
        stage.state, stage.finished = state, time.time()
        stage.ended.set()

    def _stage(self, request: web.Request) -> Stage:
        stage_id = request.match_info["stage_id"]
        stage = self.stages.get(stage_id)
        if stage is None:
            reason = "it never ran here, or the service restarted"
            raise RequestError(404, f"no stage {stage_id!r} on this service ({reason})")
        stage.last_seen = time.monotonic()  # renews its lease
        return stage

    def _forget_old(self) -> None:
        finished = [sid for sid, stage in self.stages.items() if stage.state in FINAL]
        for sid in finished[: max(len(self.stages) - KEPT_STAGES, 0)]:
            del self.stages[sid]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class RequestError(Exception):
    """A request the service cannot take: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except json.JSONDecodeError as exc:
        raise RequestError(400, f"the request body is not JSON: {exc.msg} at position {exc.pos}") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    return body


async def serve(executor: Any, host: str, port: int, token_sha256: str | None, max_request_bytes: int) -> None:
    """Serve until the process ends."""
    if not token_sha256 and not is_loopback(host):
        raise SystemExit(
            f"refusing to serve the stage API on {host} without a token: give --token-sha256, or listen on 127.0.0.1"
        )
    runner = web.AppRunner(StageService(executor, token_sha256).app(max_request_bytes), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    print(f"stage API listening on http://{host}:{port} (token {'required' if token_sha256 else 'off'})", flush=True)
    await asyncio.Event().wait()

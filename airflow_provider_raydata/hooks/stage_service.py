"""The Airflow side of the stage service (worker and triggerer): its HTTP API
(``runtime.api``) with httpx, and the Ray Jobs REST API that starts and upgrades the service
job. Imports no Ray: with an ``http(s)://`` connection the task process never loads it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import httpx
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from airflow_provider_raydata import __version__
from airflow_provider_raydata.contracts import PROTOCOL, StageResult, StageSpec
from airflow_provider_raydata.wire import decode_result, encode_spec

log = logging.getLogger(__name__)

DEFAULT_SERVICE_PORT = 8477
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled", "rolled_back"})
LIVE_JOB_STATES = frozenset({"PENDING", "RUNNING"})
REQUEST_TIMEOUT = 30.0
# How long a log read may wait on the service for the stage to end: a stage's end is seen at
# once, with one request a second while it runs, instead of polling on a timer.
LOG_WAIT_SECONDS = 1.0
LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}


@functools.cache
def ssl_context() -> ssl.SSLContext:
    """One SSL context per process for every client: building one loads the CA bundle (40 ms
    here), which in the triggerer would block the event loop once per trigger."""
    return httpx.create_ssl_context()


def log_stage_lines(logger: logging.Logger, lines: list[dict[str, Any]]) -> None:
    """A stage's log lines into the task log (worker or triggerer), each at its own level."""
    for line in lines:
        logger.log(LEVELS.get(line.get("level"), logging.INFO), "[stage] %s", line.get("message"))


@dataclass(frozen=True)
class ServiceTarget:
    """Where the stage service answers and how it is started: what a connection says."""

    url: str  # http(s)://head:8477
    auth_token: str | None
    dashboard_url: str | None  # the Jobs API, to start the service when it does not answer
    namespace: str
    runtime_env: dict[str, Any]
    executor_name: str

    @property
    def token_sha256(self) -> str | None:
        return hashlib.sha256(self.auth_token.encode()).hexdigest() if self.auth_token else None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.auth_token}"} if self.auth_token else {}

    @property
    def port(self) -> int:
        return urlparse(self.url).port or DEFAULT_SERVICE_PORT

    @property
    def bind_host(self) -> str:
        host = urlparse(self.url).hostname or ""
        return "127.0.0.1" if host in ("127.0.0.1", "localhost", "::1") else "0.0.0.0"


def check_response(response: httpx.Response, url: str, what: str) -> dict[str, Any]:
    """The decoded body, or an Airflow error that names the service and the problem (never the token)."""
    if response.status_code == 401:
        raise AirflowException(
            f"The stage service at {url} rejected the token ({what}): set the raydata connection's password "
            "to the service's token"
        )
    try:
        body = response.json()
    except ValueError:
        body = {"error": response.text[:500]}
    if response.is_error:
        error = body.get("error") if isinstance(body, dict) else body
        raise AirflowException(f"The stage service at {url} answered {what} with HTTP {response.status_code}: {error}")
    return body


class MissingInput(AirflowException):
    """A source had nothing to read (``contracts.MissingInputError``): retried like any
    AirflowException unless the extract's ``on_missing`` says otherwise."""


def unreachable(url: str, exc: Exception) -> AirflowException:
    return AirflowException(f"The stage service at {url} is unreachable: {type(exc).__name__}: {exc}")


def stage_outcome(view: dict[str, Any], label: str) -> StageResult:
    """A finished stage's result, or the Airflow error for its failure (no retries for a data error)."""
    state = view["state"]
    if state in ("succeeded", "held"):
        return decode_result(view["result"])
    if state == "failed":
        error = view.get("error") or {}
        # The remote traceback: kept out of the way for a data error, whose message says it all.
        level = logging.DEBUG if error.get("data_error") else logging.INFO
        log.log(level, "Stage failed on %s:\n%s", label, error.get("detail") or error.get("message"))
        failure = AirflowFailException if error.get("data_error") else AirflowException
        raise (MissingInput if error.get("missing_input") else failure)(
            f"Stage failed on {label}: {error.get('message')}"
        )
    if state == "rolled_back":
        raise AirflowException(
            f"The load on {label} was rolled back before it was committed (it waited longer than the executor's "
            "commit wait, or a newer try of this task replaced it): nothing was published"
        )
    reason = (view.get("error") or {}).get("message")
    raise AirflowException(f"Stage {view['stage_id']} on {label} was cancelled ({reason or state})")


class StageServiceClient:
    """Synchronous calls to one stage service (the worker side)."""

    def __init__(self, target: ServiceTarget, timeout: float = REQUEST_TIMEOUT) -> None:
        self.target = target
        self.http = httpx.Client(base_url=target.url, headers=target.headers, timeout=timeout, verify=ssl_context())

    def call(self, method: str, path: str, what: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise unreachable(self.target.url, exc) from None
        return check_response(response, self.target.url, what)

    def health(self) -> dict[str, Any]:
        return self.call("GET", "/v1/health", "a health check")

    def submit(self, spec: StageSpec, lease_seconds: float | None = None) -> dict[str, Any]:
        """``lease_seconds``: the service cancels the stage once no request asked about it for that long."""
        body = {"spec": encode_spec(spec), "lease_seconds": lease_seconds}
        return self.call("POST", "/v1/stages", f"the submit of stage {spec.stage_id}", json=body)

    def status(self, stage_id: str) -> dict[str, Any]:
        return self.call("GET", f"/v1/stages/{stage_id}", f"the status of stage {stage_id}")

    def logs(self, stage_id: str, offset: int, wait: float = 0) -> dict[str, Any]:
        """Log lines from ``offset`` and the state; with ``wait``, answered when the stage ends or after ``wait`` s."""
        params = {"offset": offset, "wait": wait}
        return self.call("GET", f"/v1/stages/{stage_id}/logs", "a log read", params=params)

    def cancel(self, stage_id: str) -> dict[str, Any]:
        return self.call("POST", f"/v1/stages/{stage_id}/cancel", f"the cancel of stage {stage_id}")

    def commit(self, stage_id: str, commit: bool) -> dict[str, Any]:
        return self.call("POST", f"/v1/stages/{stage_id}/commit", "a commit", json={"commit": commit})

    def close(self) -> None:
        self.http.close()

    # --- the service job -------------------------------------------------------------------

    def ensure_running(self, start_timeout: float = 120.0) -> dict[str, Any]:
        """The service's health; started (or replaced, when it runs another version of this
        provider) through the Jobs API when the connection names a dashboard."""
        try:
            health = self.health()
        except AirflowException as exc:
            if "unreachable" not in str(exc):
                raise
            if not self.target.dashboard_url:
                raise AirflowException(
                    f"{exc}; give the connection a dashboard_url so the provider can start the service through "
                    "the Ray Jobs API, or start it on the head (python -m airflow_provider_raydata.runtime.service)"
                ) from None
            health = None
        if health is not None and (health.get("version"), health.get("protocol")) == (__version__, PROTOCOL):
            return health
        if not self.target.dashboard_url:
            raise AirflowException(
                f"The stage service at {self.target.url} runs provider {health.get('version')} (protocol "
                f"{health.get('protocol')}), this worker {__version__} (protocol {PROTOCOL}); give the connection a "
                "dashboard_url so the provider can replace it, or restart it with this version"
            )
        jobs = JobsApi(self.target.dashboard_url, self.target.headers)
        if health is not None:
            log.warning(
                "The stage service at %s runs provider %s (protocol %s); replacing it with %s (protocol %s)",
                self.target.url,
                health.get("version"),
                health.get("protocol"),
                __version__,
                PROTOCOL,
            )
        target = self.target
        job = jobs.start_once(service_submission(target), service_entrypoint(target), target.runtime_env, target.port)
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                health = self.health()
                if health.get("version") == __version__:
                    return health
            except AirflowException as exc:
                if "unreachable" not in str(exc):
                    raise
            status = jobs.call("GET", f"/api/jobs/{job}")["status"]
            if status not in LIVE_JOB_STATES:
                logs = jobs.call("GET", f"/api/jobs/{job}/logs").get("logs", "")
                raise AirflowException(f"The stage service job {job} ended ({status}):\n{logs[-2000:]}")
            if time.monotonic() > deadline:
                raise AirflowException(f"The stage service job {job} did not answer at {self.target.url} in time")
            time.sleep(0.5)


def service_entrypoint(target: ServiceTarget) -> str:
    """The service job's command line: no secret in it (the dashboard lists it), only the token's hash."""
    parts = [
        "python -m airflow_provider_raydata.runtime.service",
        target.executor_name,
        target.namespace,
        f"--port {target.port} --host {target.bind_host}",
    ]
    if target.token_sha256:
        parts.append(f"--token-sha256 {target.token_sha256}")
    return " ".join(parts)


def service_submission(target: ServiceTarget) -> str:
    """The service job's submission id prefix: the same for every task that wants this service,
    so tasks starting together submit it once."""
    env = json.dumps(target.runtime_env, sort_keys=True)
    fingerprint = hashlib.sha1(f"{service_entrypoint(target)}|{env}".encode()).hexdigest()[:10]
    return f"raydata-stage-service-{target.port}-{fingerprint}"


class JobsApi:
    """The Ray Jobs REST API of a dashboard (what ``JobSubmissionClient`` calls), without Ray."""

    def __init__(self, dashboard_url: str, headers: dict[str, str]) -> None:
        self.url = dashboard_url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=REQUEST_TIMEOUT)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise AirflowException(f"The Ray dashboard at {self.url} is unreachable: {exc}") from None
        if response.status_code in (401, 403):
            raise AirflowException(f"The Ray dashboard at {self.url} rejected the token (Jobs API)")
        if response.is_error:
            raise JobsApiError(response.status_code, response.text[:2000])
        return response.json()

    def start_once(self, prefix: str, entrypoint: str, runtime_env: dict[str, Any], port: int | None) -> str:
        """Submit the service job unless one with this ``prefix`` is live, and return its submission
        id. Live service jobs on the same port that are not it (another provider version or token)
        are stopped first. Submission ids are deterministic (``prefix-N``): of tasks that start
        together only one submit succeeds, the others find it."""
        jobs = [job for job in self.call("GET", "/api/jobs/") if (job.get("metadata") or {}).get("raydata_service")]
        same_port = [job for job in jobs if job["metadata"].get("port") == str(port or "")]
        if port is None:  # the Ray Client transport's executor job serves no port: never stop another
            same_port = [job for job in same_port if (job.get("submission_id") or "").startswith(f"{prefix}-")]
        mine = [job for job in same_port if (job.get("submission_id") or "").startswith(f"{prefix}-")]
        live = [job for job in mine if job["status"] in LIVE_JOB_STATES]
        if live:
            return live[0]["submission_id"]
        for job in same_port:
            if job["status"] in LIVE_JOB_STATES:
                log.warning("Stopping the stage service job %s: it holds port %s", job["submission_id"], port)
                self.call("POST", f"/api/jobs/{job['submission_id']}/stop")
                self.wait_terminal(job["submission_id"])
        submission_id = f"{prefix}-{len(mine) + 1}"
        body = {
            "entrypoint": entrypoint,
            "submission_id": submission_id,
            "runtime_env": runtime_env or None,
            "metadata": {"raydata_service": "stage-api", "port": str(port or ""), "version": __version__},
        }
        try:
            self.call("POST", "/api/jobs/", json=body)
            log.info("Started the stage service job %s on %s", submission_id, self.url)
        except JobsApiError as exc:
            if "already exists" not in exc.text:
                raise AirflowException(f"Submitting the stage service job to {self.url} failed: {exc.text}") from None
        return submission_id

    def wait_terminal(self, submission_id: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.call("GET", f"/api/jobs/{submission_id}")["status"] not in LIVE_JOB_STATES:
                return
            time.sleep(0.5)


class JobsApiError(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"HTTP {status}: {text}")
        self.status, self.text = status, text

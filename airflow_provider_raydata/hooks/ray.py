"""RayHook (Airflow worker): a ``raydata`` connection -> the transport that runs one stage at a
time, cancels it, commits a held load, streams its log lines into the task log, and turns a
stage's failure into Airflow's.

Two transports reach the same stage executor on the cluster: an ``http(s)://`` host is the stage
service's HTTP API (``hooks.stage_service``; the task process imports no Ray, and operators can
defer), a ``ray://`` host (or a bare host) the Ray Client. No connection: an embedded local Ray."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any
from urllib.parse import urlparse

from airflow.configuration import conf
from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowNotFoundException

from airflow_provider_raydata.contracts import PROTOCOL, StageResult, StageSpec
from airflow_provider_raydata.hooks.stage_service import (
    DEFAULT_SERVICE_PORT,
    FINAL_STATES,
    LOG_WAIT_SECONDS,
    JobsApi,
    MissingInput,
    ServiceTarget,
    StageServiceClient,
    log_stage_lines,
    stage_outcome,
)
from airflow_provider_raydata.runtime.errors import failure_kind, root_cause

DEFAULT_CLIENT_PORT = 10001
DEFAULT_CONNECT_TIMEOUT = 30.0
# A new client that connects right after another one disconnected is sometimes refused with
# "Initialization failure from server" (measured: 2 in 40): retry a few times.
# The session handshake after the probe may take this many connect_timeouts before it is abandoned.
HANDSHAKE_TIMEOUT_FACTOR = 4
CANCEL_TIMEOUT = 40  # the executor waits up to 30 s for the stage's process to end
TRANSIENT_CONNECT_ERRORS = ("Initialization failure from server", "ray client connection timeout")
LOG_POLL_SECONDS = 1.0  # how often a running stage's new log lines are fetched
SERVICE_POLL_ATTEMPTS = 5  # polls of a stage service that does not answer before the stage is lost


@dataclass
class ClusterSettings:
    """What a connection says about the cluster. ``address`` None means an embedded local Ray."""

    address: str | None = None  # ray://host:port: the Ray Client transport
    service_url: str | None = None  # http(s)://host:port: the stage service's HTTP API
    namespace: str | None = None
    runtime_env: dict[str, Any] = field(default_factory=dict)
    auth_token: str | None = field(default=None, repr=False)
    dashboard_url: str | None = None
    staging_uri: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    log_to_driver: bool = False

    @property
    def embedded(self) -> bool:
        return self.address is None and self.service_url is None

    @property
    def transport(self) -> str:
        return "service" if self.service_url else "embedded" if self.address is None else "ray_client"

    @property
    def label(self) -> str:
        return self.service_url or self.address or "embedded local Ray"

    def executor_name(self) -> str:
        """The cluster's stage executor for this provider version, protocol and runtime_env."""
        from airflow_provider_raydata import __version__

        env = json.dumps(self.runtime_env, sort_keys=True)
        digest = hashlib.sha1(env.encode()).hexdigest()[:10]
        return f"raydata-stage-executor-{__version__}-p{PROTOCOL}-{digest}"


class RayHook(BaseHook):
    """Connects to a Ray cluster through the Ray Client and runs ``run_stage`` specs on it.

    Without a ``raydata_default`` connection (or with ``raydata_conn_id=None``) it starts an
    embedded local Ray in the worker process instead: good for demos and tests, not production.
    """

    conn_name_attr = "raydata_conn_id"
    default_conn_name = "raydata_default"
    conn_type = "raydata"
    hook_name = "Ray Data"

    def __init__(
        self,
        raydata_conn_id: str | None = default_conn_name,
        connect_timeout: float | None = None,
        connect_attempts: int = 3,
    ) -> None:
        super().__init__()
        self.raydata_conn_id = raydata_conn_id
        self._connect_timeout = connect_timeout
        self.connect_attempts = connect_attempts
        self._running = None
        self._executor = None
        self._stage_id = ""
        self._held = False  # the last stage left a load published in an open transaction
        self._service: StageServiceClient | None = None
        self.stage_page: str | None = None  # the stage's page in the dashboard (#/jobs/../tasks/..)
        self.log_offset = 0  # the stage's log lines already in the task log
        self.on_stage_page: Callable[[], None] | None = None  # called (main thread) once it is known
        # On the service: a stage no request asked about for this long is cancelled there.
        self.stage_lease_seconds = conf.getfloat("raydata", "stage_lease_seconds", fallback=300.0)

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        from airflow_provider_raydata import get_provider_info

        behaviour = get_provider_info()["connection-types"][0]["ui-field-behaviour"]
        return {
            "hidden_fields": behaviour["hidden-fields"],
            "relabeling": behaviour["relabeling"],
            "placeholders": behaviour["placeholders"],
        }

    @cached_property
    def settings(self) -> ClusterSettings:
        if self.raydata_conn_id is None:
            return ClusterSettings()
        try:
            conn = self.get_connection(self.raydata_conn_id)
        except AirflowNotFoundException:
            if self.raydata_conn_id != self.default_conn_name:
                raise
            self.log.info("No %r connection: using an embedded local Ray", self.raydata_conn_id)
            return ClusterSettings()
        return settings_from_connection(conn.host, conn.port, conn.password, conn.extra_dejson)

    @property
    def connect_timeout(self) -> float:
        return float(self._connect_timeout or self.settings.connect_timeout)

    def test_connection(self) -> tuple[bool, str]:
        try:
            if self.settings.service_url:
                health = self.service().health()
                return True, (
                    f"Connected to the stage service at {self.settings.service_url} (provider {health['version']}, "
                    f"Ray {health['ray_version']}, Python {health['python']})"
                )
            with self.connect():
                import ray

                cpus = ray.cluster_resources().get("CPU", 0)
            return True, f"Connected to {self.settings.label} ({cpus:g} CPUs)"
        except Exception as exc:
            return False, str(exc)

    @contextmanager
    def connect(self) -> Iterator[None]:
        """A Ray session for a stage. A Ray Client session stays open for the next stage on the
        same cluster in this process (a new session costs seconds); another cluster replaces it."""
        import ray

        hand_ray_logging_to_the_task_log(self.log)
        settings = self.settings
        if settings.embedded:
            if ray.is_initialized() and not _is_embedded(ray):
                ray.shutdown()
                _client_session.clear()
            if not ray.is_initialized():
                # An explicit auth mode: a local ray.init() otherwise turns token auth on and
                # writes ~/.ray/auth_token, which later `ray start --head` clusters then require.
                os.environ.setdefault("RAY_AUTH_MODE", "disabled")
                ray.init(
                    namespace=settings.namespace,
                    runtime_env=settings.runtime_env or None,
                    include_dashboard=False,
                    log_to_driver=True,
                )
            yield  # the embedded Ray lives as long as this process: later stages reuse it
            return
        from ray.util.client import ray as ray_client

        probe_cluster(settings, self.connect_timeout)  # bounded: unreachable or bad token fail here
        key = _session_key(settings)
        if not (ray_client.is_connected() and _client_session.get("key") == key):
            if ray.is_initialized() or ray_client.is_connected():
                ray.shutdown()
            _client_session.clear()
            self._connect_client(settings)
            _client_session["key"] = key
        yield

    def _connect_client(self, settings: ClusterSettings) -> None:
        import ray

        # Streaming worker logs back costs the client server a second Ray connection (~4 s here).
        kwargs: dict[str, Any] = {"namespace": settings.namespace, "log_to_driver": settings.log_to_driver}
        if settings.runtime_env:
            kwargs["runtime_env"] = settings.runtime_env
        if settings.auth_token:
            kwargs["_metadata"] = [("authorization", f"Bearer {settings.auth_token}")]
        for attempt in range(1, self.connect_attempts + 1):
            try:
                # Generous: a new client server process starts per session (seconds on a busy head).
                handshake = HANDSHAKE_TIMEOUT_FACTOR * self.connect_timeout
                _bounded(lambda: ray.init(settings.address, **kwargs), handshake, settings.address, ray.shutdown)
                return
            except Exception as error:  # noqa: BLE001 - classified below
                message = _redact(str(error), settings)
                if ray.is_initialized():
                    ray.shutdown()
            if "version mismatch" in message.lower():
                raise AirflowException(f"Ray version mismatch with the cluster at {settings.address}: {message}")
            if not any(text in message for text in TRANSIENT_CONNECT_ERRORS) or attempt == self.connect_attempts:
                raise AirflowException(
                    f"Could not connect to the Ray cluster at {settings.address} "
                    f"(attempt {attempt} of {self.connect_attempts}): {message}"
                )
            self.log.warning("Connecting to %s failed (attempt %d): %s", settings.address, attempt, message)
            time.sleep(attempt)

    # --- the stage service's HTTP API ---------------------------------------------------------

    def service(self) -> StageServiceClient:
        """The stage service of an ``http(s)://`` connection, started or upgraded if needed."""
        if self._service is None:
            settings = self.settings
            target = ServiceTarget(
                url=settings.service_url,
                auth_token=settings.auth_token,
                dashboard_url=settings.dashboard_url,
                namespace=settings.namespace or "raydata",
                runtime_env=settings.runtime_env,
                # Its own executor: a stopped service job takes its stages with it, and no other.
                executor_name=f"{settings.executor_name()}-http{urlparse(settings.service_url).port}",
            )
            client = StageServiceClient(target)
            client.ensure_running()
            self._service = client
        return self._service

    def start_stage(self, spec: StageSpec, wait: float) -> StageResult | None:
        """Submit a stage to the stage service and wait for it at most ``wait`` seconds, streaming
        its log (deferrable operators): its result if it ended, else None (``stage_id`` and
        ``log_offset`` then say where a trigger takes over)."""
        return self._run_on_service(replace(spec, stage_id=spec.stage_id or uuid.uuid4().hex), None, give_up=wait)

    @property
    def stage_id(self) -> str:
        return self._stage_id

    def _see_page(self, page: str | None) -> bool:
        if page and page != self.stage_page:
            self.stage_page = page
            if self.on_stage_page and threading.current_thread() is threading.main_thread():
                self.on_stage_page()
        return bool(page)

    def dashboard_link(self) -> str:
        """The dashboard's page of the current stage, or the dashboard (empty without one)."""
        base = (self.settings.dashboard_url or "").rstrip("/")
        return f"{base}/{self.stage_page}" if base and self.stage_page else base

    def finished_stage(self, stage_id: str) -> StageResult:
        """A submitted stage's result once it has ended (``execute_complete``), or its failure."""
        self._stage_id = stage_id
        view = self.service().status(stage_id)
        self._see_page(view.get("dashboard_path"))
        result = stage_outcome(view, self.settings.label)
        self._held = result.held
        return result

    def emit_stage_lines(self, lines: list[dict[str, Any]]) -> None:
        log_stage_lines(self.log, lines)

    def _run_on_service(
        self, spec: StageSpec, timeout: float | None, give_up: float | None = None
    ) -> StageResult | None:
        """The stage's result; None if it still runs after ``give_up`` seconds."""
        service = self.service()
        self._stage_id = spec.stage_id
        service.submit(spec, lease_seconds=self.stage_lease_seconds)
        self._running = spec.stage_id
        now = time.monotonic()
        deadline = now + timeout if timeout else None
        give_up_at = now + give_up if give_up is not None else None
        self.log_offset = 0
        try:
            while True:  # each read waits on the service up to LOG_WAIT_SECONDS for the stage to end
                wait = LOG_WAIT_SECONDS if give_up_at is None else max(min(LOG_WAIT_SECONDS, give_up_at - now), 0)
                page = self._poll(service, spec.stage_id, self.log_offset, wait)
                self._see_page(page.get("dashboard_path"))
                self.emit_stage_lines(page["lines"])
                self.log_offset = page["next_offset"]
                if page["state"] in FINAL_STATES or page["state"] == "held":
                    self.emit_stage_lines(service.logs(spec.stage_id, self.log_offset)["lines"])
                    break
                now = time.monotonic()
                if give_up_at is not None and now >= give_up_at:
                    return None
                if deadline and now > deadline:
                    self.cancel()
                    raise AirflowException(f"Stage did not finish within {timeout}s on {self.settings.label}")
            result = stage_outcome(service.status(spec.stage_id), self.settings.label)
        finally:
            self._running = None
        self._held = result.held
        return result

    def _poll(self, service: StageServiceClient, stage_id: str, offset: int, wait: float) -> dict[str, Any]:
        """The stage's new log lines and state; a service gone for good loses the stage (retryable)."""
        attempt = 1
        while True:
            try:
                return service.logs(stage_id, offset, wait=wait)
            except AirflowException as exc:
                lost = "no stage" in str(exc)
                if not lost and "unreachable" not in str(exc):
                    raise
                if lost or attempt == SERVICE_POLL_ATTEMPTS:
                    raise AirflowException(
                        f"Lost stage {stage_id} on {self.settings.label}: the stage service stopped answering "
                        f"for it ({exc}); a retry starts the service again"
                    ) from None
            attempt += 1
            time.sleep(1)

    # --- both transports --------------------------------------------------------------------

    def run_stage(self, spec: StageSpec, timeout: float | None = None) -> StageResult:
        """Run one stage on the cluster and return its small result."""
        spec = replace(spec, stage_id=spec.stage_id or uuid.uuid4().hex)
        if self.settings.service_url:
            return self._run_on_service(spec, timeout)
        import grpc
        from ray import cloudpickle
        from ray.exceptions import RayError, RayTaskError

        from airflow_provider_raydata.pickling import register_by_value

        register_by_value(cloudpickle)
        with self.connect():
            self._executor = self.stage_executor()
            self._stage_id = spec.stage_id
            self._running = self._executor.run.remote(spec)
            # Wait in a helper thread: the main thread then holds no Ray Client lock when
            # Airflow's SIGTERM handler calls on_kill -> cancel() on it.
            waiter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raydata-stage")
            try:
                result = waiter.submit(self._wait_streaming, self._running).result(timeout=timeout)
                self._held = result.held
                return result
            except FutureTimeout:
                self.cancel()
                drop_client_session()
                raise AirflowException(f"Stage did not finish within {timeout}s on {self.settings.label}") from None
            except RayTaskError as exc:
                # The remote traceback: kept out of the way for a data error, whose message says it all.
                self.log.log(
                    logging.DEBUG if failure_kind(exc)[0] else logging.INFO,
                    "Stage failed on %s:\n%s",
                    self.settings.label,
                    exc,
                )
                raise failure(exc)(f"Stage failed on {self.settings.label}: {root_cause(exc)}") from None
            except (RayError, ConnectionError, grpc.RpcError) as exc:
                drop_client_session()  # a dropped connection: the next stage starts a new session
                raise AirflowException(
                    f"Lost the stage on {self.settings.label}: {type(exc).__name__}: {exc}"
                ) from None
            finally:
                waiter.shutdown(wait=False)
                self._running = None

    def _wait_streaming(self, ref) -> StageResult:
        """The stage's result; meanwhile its new log lines, every ``LOG_POLL_SECONDS``."""
        import ray

        offset = 0
        while True:
            ready, _ = ray.wait([ref], timeout=LOG_POLL_SECONDS)
            lines, offset, page = ray.get(self._executor.logs.remote(self._stage_id, offset))
            self._see_page(page)  # a helper thread: the operator links it once the stage returns
            self.emit_stage_lines(lines)
            if ready:
                return ray.get(ref)

    def commit_held_load(self, commit: bool = True) -> None:
        """Commit (or roll back) the transaction the last stage, a load, left open on the cluster."""
        if not self._held:
            return
        self._held = False
        if self.settings.service_url:
            view = self.service().commit(self._stage_id, commit)
            if view["state"] == "failed":
                stage_outcome(view, self.settings.label)  # raises: the COMMIT itself failed
            if commit and not view["done"]:
                stage_outcome({**view, "state": "rolled_back"}, self.settings.label)
            return
        import ray
        from ray.exceptions import RayError, RayTaskError

        try:
            with self.connect():
                done = ray.get(self._executor.commit.remote(self._stage_id, commit), timeout=CANCEL_TIMEOUT)
        except RayTaskError as exc:  # the COMMIT itself failed (a deferred constraint, ...)
            raise failure(exc)(
                f"Committing the load on {self.settings.label} failed, nothing published: {root_cause(exc)}"
            ) from None
        except (RayError, ConnectionError) as exc:
            drop_client_session()
            raise AirflowException(
                f"Lost {self.settings.label} while committing the load ({type(exc).__name__}: {exc}); the retry "
                "finds it published or not (an append already published is skipped, never loaded twice)"
            ) from None
        if commit and not done:
            raise AirflowException(
                f"The load on {self.settings.label} was rolled back before this task could commit it (it waited"
                " longer than the executor's commit wait, or a newer try of this task replaced it): nothing was"
                " published"
            )

    def stage_executor(self):
        """The cluster's long-lived stage driver for this namespace and runtime_env.

        With a dashboard URL it lives in a service job submitted through the Jobs API (warm
        workers: see ``runtime.service``); otherwise it is a detached actor created here.
        """
        from airflow_provider_raydata.runtime.executor import StageExecutor

        name = self.settings.executor_name()
        namespace = self.settings.namespace or "raydata"
        try:
            return _executor_handle(name, namespace)
        except ValueError:
            pass
        if self.settings.dashboard_url and not self.settings.embedded:
            return self._start_executor_service(name, namespace)
        return StageExecutor.options(name=name, namespace=namespace, lifetime="detached", get_if_exists=True).remote()

    def _start_executor_service(self, name: str, namespace: str):
        """Submit the service job (once, even when several first tasks race) and wait for its executor."""
        headers = {"Authorization": f"Bearer {self.settings.auth_token}"} if self.settings.auth_token else {}
        jobs = JobsApi(self.settings.dashboard_url, headers)
        env = json.dumps(self.settings.runtime_env, sort_keys=True)
        prefix = f"raydata-stage-service-client-{hashlib.sha1(f'{name}|{namespace}|{env}'.encode()).hexdigest()[:10]}"
        entrypoint = f"python -m airflow_provider_raydata.runtime.service {name} {namespace}"
        job_id = jobs.start_once(prefix, entrypoint, self.settings.runtime_env, port=None)
        deadline = time.monotonic() + max(self.connect_timeout, 60)
        while time.monotonic() < deadline:
            try:
                return _executor_handle(name, namespace)
            except ValueError:
                status = jobs.call("GET", f"/api/jobs/{job_id}")["status"]
                if status not in ("PENDING", "RUNNING"):
                    logs = jobs.call("GET", f"/api/jobs/{job_id}/logs").get("logs", "")
                    raise AirflowException(
                        f"The stage executor job {job_id} on {self.settings.label} ended ({status}): {logs[-2000:]}"
                    ) from None
                time.sleep(0.5)
        raise AirflowException(f"The stage executor job {job_id} on {self.settings.label} did not start in time")

    def cancel(self) -> None:
        """Cancel the running stage (``on_kill``, ``stage_timeout``): the executor cancels the
        stage's Ray task (``ray.cancel``) and ends its process (``ray.kill``) before it commits;
        a load awaiting its commit is rolled back the same way."""
        if self._running is None and not self._held:
            return
        if self.settings.service_url:
            # A client of its own: on_kill runs in a signal handler, maybe inside a call of the main one.
            client = StageServiceClient(self.service().target)
            try:
                stopped = client.cancel(self._stage_id)["cancelled"]
            finally:
                client.close()
            self.log.warning(
                "Cancelled stage %s on %s (%s)",
                self._stage_id,
                self.settings.label,
                "stopped" if stopped else "it had already ended",
            )
            return
        import ray

        stopped = ray.get(self._executor.cancel.remote(self._stage_id), timeout=CANCEL_TIMEOUT)
        self.log.warning(
            "Cancelled stage %s on %s (%s)",
            self._stage_id,
            self.settings.label,
            "stopped" if stopped else "it had already ended",
        )


def failure(exc: BaseException) -> type[AirflowException]:
    """AirflowFailException (no retries) for a data error (``contracts.is_data_error``),
    ``MissingInput`` for a source with nothing to read (the extract's ``on_missing`` decides),
    else a retryable AirflowException: the one place where a stage's failure becomes Airflow's."""
    data, missing = failure_kind(exc)
    if missing:
        return MissingInput
    return AirflowFailException if data else AirflowException


def _executor_handle(name: str, namespace: str):
    """``ray.get_actor`` for the stage executor, with its methods known up front. Over the Ray
    Client a looked-up handle otherwise learns its methods on first use from a Ray task, which
    needs a new worker for this client's job: 2.7 s of every Airflow task here."""
    import ray
    from ray.util.client.common import ClientActorClass, ClientActorHandle

    from airflow_provider_raydata.runtime.executor import StageExecutor

    handle = ray.get_actor(name, namespace=namespace)
    if not isinstance(handle, ClientActorHandle):  # an embedded local Ray: a real actor handle
        return handle
    return ClientActorHandle(handle.actor_ref, ClientActorClass(StageExecutor.__ray_metadata__.modified_class))


def probe_cluster(settings: ClusterSettings, timeout: float) -> None:
    """Fail fast and clearly: the Ray Client itself retries for about 30 s on an unreachable
    cluster or a rejected token and then only says "connection timeout"."""
    import grpc
    from ray.core.generated import ray_client_pb2, ray_client_pb2_grpc

    parsed = urlparse(settings.address)
    host, port = parsed.hostname or "", parsed.port or DEFAULT_CLIENT_PORT
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise AirflowException(f"Ray cluster at {settings.address} is unreachable: {exc.strerror or exc}") from None
    channel = grpc.insecure_channel(f"{host}:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
        metadata = [("authorization", f"Bearer {settings.auth_token}")] if settings.auth_token else []
        ray_client_pb2_grpc.RayletDriverStub(channel).ClusterInfo(
            ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING),
            timeout=timeout,
            metadata=metadata,
        )
    except grpc.FutureTimeoutError:
        raise AirflowException(
            f"Ray cluster at {settings.address} accepted a TCP connection but no Ray Client "
            f"handshake within {timeout:g}s"
        ) from None
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            problem = "was rejected" if settings.auth_token else "is required (set the connection's password)"
            raise AirflowException(
                f"Ray cluster at {settings.address} uses token authentication and the auth token {problem}"
            ) from None
        raise AirflowException(f"Ray cluster at {settings.address} did not answer a ping: {exc.code().name}") from None
    finally:
        channel.close()


def settings_from_connection(
    host: str | None, port: int | None, password: str | None, extra: dict[str, Any]
) -> ClusterSettings:
    def get(name: str, default: Any = None) -> Any:
        value = extra.get(name, extra.get(f"extra__raydata__{name}"))
        return default if value in (None, "") else value

    def as_dict(name: str) -> dict[str, Any]:
        value = get(name, {})
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise AirflowException(f"Connection field {name!r} is not valid JSON: {exc.msg}") from None
        return dict(value)

    address = service_url = None
    if host and host.startswith(("http://", "https://")):
        parsed = urlparse(host)
        service_url = f"{parsed.scheme}://{parsed.hostname}:{parsed.port or port or DEFAULT_SERVICE_PORT}"
    elif host:
        address = host if "://" in host else f"ray://{host}:{port or DEFAULT_CLIENT_PORT}"
        if not address.startswith("ray://"):
            raise AirflowException(
                f"The raydata connection's host must start with ray:// (the Ray Client) or http(s):// (the stage "
                f"service), got scheme {address.split('://')[0]!r}"
            )
        if port and urlparse(address).port is None:
            address = f"{address}:{port}"
    return ClusterSettings(
        address=address,
        service_url=service_url,
        namespace=get("namespace"),
        runtime_env=as_dict("runtime_env"),
        auth_token=password or None,
        dashboard_url=get("dashboard_url"),
        staging_uri=get("staging_uri"),
        storage_options=as_dict("storage_options"),
        connect_timeout=float(get("connect_timeout", DEFAULT_CONNECT_TIMEOUT)),
        log_to_driver=str(get("log_to_driver", False)).lower() in ("true", "1", "yes"),
    )


CLIENT_LOG_STREAM = "ray.util.client.logsclient"  # Ray's logger for its client server's records (no propagation)


class _ToTaskLog(logging.Handler):
    """Ray's log records, on to a task's logger at their own levels."""

    def __init__(self, target: Any) -> None:
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        self.target.log(record.levelno, "[ray] %s", record.getMessage())


def hand_ray_logging_to_the_task_log(target: Any) -> None:
    """Ray's loggers write to stderr through a handler of their own, and an Airflow task log shows
    whatever reaches stderr as ERROR lines (Ray's "SIGTERM handler is not set" warning, its INFO
    lines about the client session), and a Ray Client session's server streams its own records
    back (its ``ray.init`` warns the same there). They go to ``target``, the hook's logger, instead."""
    for name in ("ray", CLIENT_LOG_STREAM):
        logger = logging.getLogger(name)
        logger.handlers = [_ToTaskLog(target)]
        logger.propagate = False


def _bounded(call, timeout: float, address: str | None, undo) -> None:
    """Run ``call`` with a deadline. The Ray Client's session handshake has none of its own: seen
    here, a client server that never answered kept ``ray.init`` waiting forever. A handshake that
    completes after the deadline is undone, so the next connect starts clean."""
    outcome: dict[str, BaseException | None] = {}
    abandoned = threading.Event()

    def target() -> None:
        try:
            call()
            outcome["error"] = None
            if abandoned.is_set():
                undo()
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=target, name="ray-client-connect", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        abandoned.set()
        if "error" not in outcome:
            raise AirflowException(f"The Ray Client session to {address} did not start within {timeout:g}s")
    if outcome["error"] is not None:
        raise outcome["error"]


# The Ray Client session of this process: which cluster and settings it was opened with.
_client_session: dict[str, str] = {}


def drop_client_session() -> None:
    """Close this process's Ray Client session: the next stage opens a new one."""
    import ray

    ray.shutdown()
    _client_session.clear()


def _session_key(settings: ClusterSettings) -> str:
    token = hashlib.sha256((settings.auth_token or "").encode()).hexdigest()
    env = json.dumps(settings.runtime_env, sort_keys=True)
    return f"{settings.address}|{settings.namespace}|{env}|{settings.log_to_driver}|{token}"


def _is_embedded(ray_module) -> bool:
    return not ray_module.util.client.ray.is_connected()


def _redact(message: str, settings: ClusterSettings) -> str:
    return message.replace(settings.auth_token, "***") if settings.auth_token else message

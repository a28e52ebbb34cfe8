"""A real Airflow 3 deployment on this machine, for tests.

``AirflowStack`` runs ``airflow db migrate`` and then the processes that a LocalExecutor
deployment needs (scheduler, dag-processor, api-server; a triggerer only on request) as
subprocesses, each in its own session with its log in ``home/logs``. Tasks run as children
of the scheduler (LocalExecutor) and talk to the api-server's execution API.

The metadata database is a private PostgreSQL (initdb into a temporary folder, loopback
port, fsync off). ``database="sqlite"`` exists but is NOT usable for backfills: creating a
backfill while the scheduler runs fails at random with "database is locked" (both the CLI
and ``POST /backfills``); Airflow then deletes the half-made backfill's runs, which for
``reprocess_behavior=completed`` are the *existing* runs, and the scheduler crashes on the
vanished rows.

Typical use::

    with AirflowStack(tmp / "home", dags, env={"AIRFLOW_CONN_X": "..."}) as stack:
        runs = stack.backfill("my_dag", "2024-01-01", "2024-01-07")
        assert {r["state"] for r in runs} == {"success"}
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx
import psutil

T = TypeVar("T")

FINAL_RUN_STATES = frozenset({"success", "failed"})
Reprocess = Literal["none", "completed", "failed"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _iso(day: str) -> str:
    """'2024-01-01' -> '2024-01-01T00:00:00Z'; full timestamps pass through."""
    return day if "T" in day else f"{day}T00:00:00Z"


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


def _signal(processes: list[psutil.Process], sig: int) -> None:
    for p in processes:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))), None)
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} was not found (apt-get install postgresql)")
    return str(found)


class AirflowStack:
    """Scheduler + dag-processor + api-server (+ optional triggerer) on loopback."""

    def __init__(
        self,
        home: Path,
        dags_folder: Path,
        env: dict[str, str] | None = None,
        *,
        database: Literal["postgres", "sqlite"] = "postgres",
        parallelism: int = 4,
        triggerer: bool = False,
        startup_timeout: float = 240.0,
    ) -> None:
        self.home = Path(home).resolve()
        self.dags_folder = Path(dags_folder).resolve()
        self.database = database
        self.logs = self.home / "logs"
        self.api_port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.api_port}"
        self.startup_timeout = startup_timeout
        self.components = ["scheduler", "dag-processor", "api-server"] + (["triggerer"] if triggerer else [])
        venv_airflow = Path(sys.executable).with_name("airflow")
        self.airflow = str(venv_airflow) if venv_airflow.exists() else shutil.which("airflow") or "airflow"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._pg: subprocess.Popen[bytes] | None = None
        self._pg_dir: Path | None = None
        self._pg_port = _free_port()
        self._client: httpx.Client | None = None

        if database == "postgres":
            sql_conn = f"postgresql+psycopg2://airflow@127.0.0.1:{self._pg_port}/airflow"
        else:
            sql_conn = f"sqlite:///{self.home / 'airflow.db'}"
        # Inherited Airflow settings (e.g. a unit-test AIRFLOW_HOME) must not leak into the stack.
        base = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        base["PATH"] = f"{Path(self.airflow).parent}{os.pathsep}{base.get('PATH', '')}"
        self.environ: dict[str, str] = {
            **base,
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": str(parallelism),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            # The default is http://localhost:8080/execution/ whatever [api] port says.
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base_url}/execution/",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": sql_conn,
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.api_port),
            "AIRFLOW__API__BASE_URL": self.base_url,
            "AIRFLOW__API__MAXIMUM_PAGE_LIMIT": "1000",
            "AIRFLOW__API__SECRET_KEY": secrets.token_hex(32),
            # Shared by the scheduler (signs task tokens) and the api-server (checks them).
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(64),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(_free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(_free_port()),
            # New/changed DAG files are seen within seconds instead of minutes.
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "2",
            "AIRFLOW__DAG_PROCESSOR__BUNDLE_REFRESH_CHECK_INTERVAL": "1",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
            # A task notices "mark failed"/"clear" at its next heartbeat (default every 5 s).
            "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
            **(env or {}),
        }

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> AirflowStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Migrate the database, start the processes and wait until all report healthy."""
        self.logs.mkdir(parents=True, exist_ok=True)
        try:
            if self.database == "postgres":
                self._start_postgres()
            self._run(["db", "migrate"], "migrate", timeout=300)
            for name in self.components:
                self._spawn(name)
            self._wait(self._healthy, self.startup_timeout, "the Airflow processes to become healthy")
            token = httpx.get(f"{self.base_url}/auth/token", timeout=30).json()["access_token"]
            self._client = httpx.Client(
                base_url=self.base_url, headers={"Authorization": f"Bearer {token}"}, timeout=60
            )
        except BaseException:
            self.stop()
            raise

    def _spawn(self, name: str) -> None:
        with open(self.logs / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                [self.airflow, name],
                env=self.environ,
                cwd=self.home,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def kill(self, name: str) -> None:
        """SIGKILL one component (e.g. the triggerer) and all of its descendants, as a crash would."""
        proc = self.procs.pop(name)
        parent = psutil.Process(proc.pid)
        _signal([parent, *parent.children(recursive=True)], signal.SIGKILL)
        proc.wait(timeout=10)  # not its children: nothing here reaps them, psutil would wait out its timeout

    def restart(self, name: str) -> None:
        """Start a killed component again and wait until the deployment reports it healthy."""
        self._spawn(name)
        self._wait(self._healthy, self.startup_timeout, f"the restarted {name} to become healthy")

    def stop(self, timeout: float = 20.0) -> None:
        """Terminate every process we started and all of their descendants (tasks have own groups)."""
        if self._client:
            self._client.close()
            self._client = None
        victims: list[psutil.Process] = []
        for proc in self.procs.values():
            try:
                parent = psutil.Process(proc.pid)
                victims += [parent, *parent.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        _signal(victims, signal.SIGTERM)
        _, alive = psutil.wait_procs(victims, timeout=timeout)
        _signal(alive, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=5)
        for proc in self.procs.values():
            proc.wait(timeout=5)
        self.procs.clear()
        if self._pg:
            self._pg.send_signal(signal.SIGINT)  # "fast" shutdown
            try:
                self._pg.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._pg.kill()
                self._pg.wait()
            self._pg = None
        if self._pg_dir:
            shutil.rmtree(self._pg_dir, ignore_errors=True)
            self._pg_dir = None

    def _start_postgres(self) -> None:
        # A private data dir in /tmp: postgres refuses to run as root and must reach its folder.
        self._pg_dir = Path(tempfile.mkdtemp(prefix="airflow-stack-pg-"))
        user = "postgres" if os.geteuid() == 0 else None
        if user:
            shutil.chown(self._pg_dir, user, user)
        data = self._pg_dir / "data"
        with open(self.logs / "postgres.log", "ab") as log:
            subprocess.run(
                [_pg_bin("initdb"), "-D", str(data), "-U", "airflow", "--auth=trust", "-E", "UTF8", "--no-sync"],
                user=user,
                cwd=self._pg_dir,
                stdout=log,
                stderr=subprocess.STDOUT,
                check=True,
                timeout=120,
            )
            settings = {
                "listen_addresses": "127.0.0.1",
                "unix_socket_directories": str(self._pg_dir),
                "fsync": "off",
                "synchronous_commit": "off",
                "full_page_writes": "off",
            }
            args = [f"-c{k}={v}" for k, v in settings.items()]
            self._pg = subprocess.Popen(
                [_pg_bin("postgres"), "-D", str(data), "-p", str(self._pg_port), *args],
                user=user,
                cwd=self._pg_dir,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def create_db() -> bool:
            if self._pg is not None and self._pg.poll() is not None:
                raise RuntimeError(f"postgres exited:\n{_tail(self.logs / 'postgres.log')}")
            return (
                subprocess.run(
                    [
                        _pg_bin("psql"),
                        "-h",
                        "127.0.0.1",
                        "-p",
                        str(self._pg_port),
                        "-U",
                        "airflow",
                        "-d",
                        "postgres",
                        "-qc",
                        "CREATE DATABASE airflow",
                    ],
                    capture_output=True,
                ).returncode
                == 0
            )

        self._wait(create_db, 60, "PostgreSQL to accept connections")

    # ------------------------------------------------------------------ helpers
    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(
                    f"airflow {name} exited with code {proc.returncode}; log tail:\n{_tail(self.logs / f'{name}.log')}"
                )

    def _wait(self, check: Callable[[], T | None], timeout: float, what: str, every: float = 0.5) -> T:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            result = check()
            if result:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"Timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(every)

    def _healthy(self) -> bool:
        try:
            health = httpx.get(f"{self.base_url}/api/v2/monitor/health", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return False
        wanted = ["metadatabase", "scheduler", "dag_processor"] + (["triggerer"] if "triggerer" in self.procs else [])
        return all((health.get(k) or {}).get("status") == "healthy" for k in wanted)

    def _run(self, args: list[str], log_name: str, timeout: float) -> str:
        """Run an ``airflow`` CLI command with the stack's environment; raise with its output on failure."""
        res = subprocess.run(
            [self.airflow, *args], env=self.environ, cwd=self.home, capture_output=True, text=True, timeout=timeout
        )
        out = res.stdout + res.stderr
        with open(self.logs / f"{log_name}.log", "a") as f:
            f.write(f"$ airflow {' '.join(args)}\n{out}\n")
        if res.returncode:
            raise RuntimeError(f"airflow {' '.join(args)} failed ({res.returncode}):\n{out[-4000:]}")
        return out

    def cli(self, *args: str, timeout: float = 300) -> str:
        """Run ``airflow *args`` against this stack and return its output."""
        return self._run(list(args), "cli", timeout)

    # ------------------------------------------------------------------ REST API
    def api(self, method: str, path: str, json: Any = None, **params: Any) -> Any:
        """Call the public REST API (``path`` below ``/api/v2``) and return the decoded JSON."""
        if self._client is None:
            raise RuntimeError("AirflowStack is not started")
        resp = self._client.request(method, f"/api/v2/{path.lstrip('/')}", json=json, params=params or None)
        if resp.is_error:
            raise RuntimeError(f"{method} {path} -> HTTP {resp.status_code}: {resp.text[:2000]}")
        return resp.json() if resp.content else None

    def wait_for_dag(self, dag_id: str, timeout: float = 120) -> dict[str, Any]:
        """Wait until the dag-processor has serialized ``dag_id``; report import errors on timeout."""

        def found() -> dict[str, Any] | None:
            resp = self._client.get(f"/api/v2/dags/{dag_id}") if self._client else None
            return resp.json() if resp is not None and resp.status_code == 200 else None

        try:
            return self._wait(found, timeout, f"DAG {dag_id} to be parsed")
        except TimeoutError as e:
            errors = self.api("GET", "importErrors").get("import_errors", [])
            raise TimeoutError(f"{e}; import errors: {errors}") from None

    def unpause(self, dag_id: str) -> None:
        """Unpause (runs of paused DAGs, backfills included, are never started).

        With a schedule and ``catchup=False`` this also makes the scheduler create one
        ``scheduled__`` run for the latest interval.
        """
        self.api("PATCH", f"dags/{dag_id}", json={"is_paused": False})

    def dag_runs(self, dag_id: str, **params: Any) -> list[dict[str, Any]]:
        return list(
            self.api("GET", f"dags/{dag_id}/dagRuns", limit=1000, order_by="logical_date", **params)["dag_runs"]
        )

    # ------------------------------------------------------------------ backfills
    def create_backfill(
        self,
        dag_id: str,
        from_date: str,
        to_date: str,
        reprocess: Reprocess = "none",
        max_active_runs: int | None = None,
        via: Literal["cli", "api"] = "cli",
    ) -> int:
        """Create a backfill (``airflow backfill create`` or ``POST /backfills``) and return its id."""
        self.wait_for_dag(dag_id)
        self.unpause(dag_id)
        self._wait_no_active_backfill(dag_id)
        if via == "api":
            body: dict[str, Any] = {
                "dag_id": dag_id,
                "from_date": _iso(from_date),
                "to_date": _iso(to_date),
                "reprocess_behavior": reprocess,
            }
            if max_active_runs is not None:
                body["max_active_runs"] = max_active_runs
            return int(self.api("POST", "backfills", json=body)["id"])
        args = ["backfill", "create", "--dag-id", dag_id, "--from-date", from_date, "--to-date", to_date]
        args += ["--reprocess-behavior", reprocess]
        if max_active_runs is not None:
            args += ["--max-active-runs", str(max_active_runs)]
        before = self._latest_backfill_id(dag_id)
        out = self._run(args, "cli", timeout=300)
        backfill_id = self._latest_backfill_id(dag_id)
        if backfill_id <= before:  # e.g. "No runs to create" exits 0
            raise RuntimeError(f"airflow backfill create made no backfill:\n{out[-2000:]}")
        return backfill_id

    def _latest_backfill_id(self, dag_id: str) -> int:
        backfills = self.api("GET", "backfills", dag_id=dag_id, order_by="-id", limit=1)["backfills"]
        return int(backfills[0]["id"]) if backfills else 0

    def wait_for_backfill(
        self, dag_id: str, backfill_id: int, timeout: float = 600, finalize: bool = True
    ) -> list[dict[str, Any]]:
        """Wait until every run of the backfill is success/failed and return them.

        The scheduler marks a backfill completed only every 30 s, and a DAG can have one
        active backfill at a time; ``finalize`` completes it right away (``PUT .../cancel``,
        harmless once all its runs are final) so the next backfill can start at once.
        """
        b = self.api("GET", f"backfills/{backfill_id}")
        window = {"logical_date_gte": b["from_date"], "logical_date_lte": b["to_date"], "run_type": "backfill"}

        def finished() -> list[dict[str, Any]] | None:
            runs = self.dag_runs(dag_id, **window)
            return runs if runs and all(r["state"] in FINAL_RUN_STATES for r in runs) else None

        try:
            runs = self._wait(finished, timeout, f"backfill {backfill_id} of {dag_id}", every=1)
        except TimeoutError as e:
            states = {r["dag_run_id"]: r["state"] for r in self.dag_runs(dag_id, **window)}
            raise TimeoutError(f"{e}; runs: {states}\nscheduler log:\n{_tail(self.logs / 'scheduler.log')}") from None
        if finalize and not self.api("GET", f"backfills/{backfill_id}")["completed_at"]:
            try:
                self.api("PUT", f"backfills/{backfill_id}/cancel")
            except RuntimeError as e:  # 409: the scheduler completed it in between
                if "409" not in str(e):
                    raise
        keys = ("dag_run_id", "logical_date", "state", "start_date", "end_date")
        return [{k: r[k] for k in keys} for r in runs]

    def backfill(
        self,
        dag_id: str,
        from_date: str,
        to_date: str,
        reprocess: Reprocess = "none",
        max_active_runs: int | None = None,
        timeout: float = 600,
        via: Literal["cli", "api"] = "cli",
    ) -> list[dict[str, Any]]:
        """Create a backfill, wait until all its runs are final and return them (sorted by logical date)."""
        backfill_id = self.create_backfill(dag_id, from_date, to_date, reprocess, max_active_runs, via)
        return self.wait_for_backfill(dag_id, backfill_id, timeout)

    def _wait_no_active_backfill(self, dag_id: str, timeout: float = 120) -> None:
        def idle() -> bool:
            backfills = self.api("GET", "backfills", dag_id=dag_id, limit=1000)["backfills"]
            return all(b["completed_at"] for b in backfills)

        self._wait(idle, timeout, f"the active backfill of {dag_id} to complete", every=1)

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 600) -> dict[str, Any]:
        """Wait until the DAG run is success/failed and return it."""

        def final() -> dict[str, Any] | None:
            run = self.api("GET", f"dags/{dag_id}/dagRuns/{run_id}")
            return run if run["state"] in FINAL_RUN_STATES else None

        return self._wait(final, timeout, f"run {run_id} of {dag_id}", every=1)

    # ------------------------------------------------------------------ task instances
    def task_instance(self, dag_id: str, run_id: str, task_id: str) -> dict[str, Any]:
        return dict(self.api("GET", f"dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}"))

    def wait_for_task_state(
        self, dag_id: str, run_id: str, task_id: str, states: Iterable[str | None], timeout: float = 120
    ) -> dict[str, Any]:
        """Wait until the task instance is in one of ``states`` (``None`` = no state) and return it."""
        wanted = set(states)

        def reached() -> dict[str, Any] | None:
            resp = self._client.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}")  # type: ignore[union-attr]
            ti = resp.json() if resp.status_code == 200 else None
            return ti if ti is not None and ti["state"] in wanted else None

        return self._wait(reached, timeout, f"{dag_id}/{run_id}/{task_id} to be in {sorted(map(str, wanted))}")

    def set_task_state(self, dag_id: str, run_id: str, task_id: str, state: str = "failed") -> list[dict[str, Any]]:
        """Mark a task instance like the UI does (``PATCH .../taskInstances/{task_id}``).

        A running task learns it at its next heartbeat (<= 1 s here); the supervisor then sends
        SIGTERM, whose handler only calls ``on_kill()``, and SIGKILL 5 s later if the task is still alive.
        """
        path = f"dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}"
        return list(self.api("PATCH", path, json={"new_state": state})["task_instances"])

    def clear_task(self, dag_id: str, run_id: str, task_id: str) -> list[dict[str, Any]]:
        """Clear a task instance like the UI does: a running one becomes ``restarting``, is killed and re-run."""
        body = {"dry_run": False, "dag_run_id": run_id, "task_ids": [task_id], "only_failed": False}
        return list(self.api("POST", f"dags/{dag_id}/clearTaskInstances", json=body)["task_instances"])

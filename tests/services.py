"""Local services for tests and benchmarks: a Ray head started with ``ray start --head``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent


class ServiceUnavailable(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.2)
    return False


class RayHead:
    """``ray start --head`` on free ports; stopped by killing the processes of its temp dir."""

    def __init__(self, temp_dir: Path, env: dict[str, str] | None = None):
        self.temp_dir = temp_dir
        self.client_port = free_port()
        self.dashboard_port = free_port()
        # Jobs submitted to the head run `python ...`: it must be this environment's Python.
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
        self.gcs_port = free_port()
        self.address = f"ray://127.0.0.1:{self.client_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"

    def start(self) -> None:
        cmd = [
            str(BIN / "ray"),
            "start",
            "--head",
            f"--port={self.gcs_port}",
            f"--ray-client-server-port={self.client_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--dashboard-agent-listen-port={free_port()}",
            "--num-cpus=2",
            "--include-dashboard=true",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
        ]
        result = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120)
        if result.returncode != 0 or not wait_for_port(self.client_port, 60):
            self.stop()
            raise ServiceUnavailable(f"ray start --head failed: {result.stdout[-2000:]}{result.stderr[-2000:]}")

    def stop(self) -> None:
        import psutil

        # The client server's processes name the GCS address, not the temp dir.
        markers = (str(self.temp_dir), f":{self.gcs_port}")
        matched = set()
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if any(marker in part for part in proc.info["cmdline"] or [] for marker in markers):
                    matched.add(proc)
                    matched.update(proc.children(recursive=True))  # e.g. the executor's service job
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        for proc in matched:
            try:
                proc.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        time.sleep(1)

    def connection(self, **extra) -> dict:
        """An Airflow connection (JSON form) to this head."""
        return {
            "conn_type": "raydata",
            "host": "127.0.0.1",
            "port": self.client_port,
            "extra": {"dashboard_url": self.dashboard_url, **extra},
        }


class PostgresServer:
    """A private PostgreSQL cluster (``initdb`` + ``pg_ctl``) on a free loopback port.

    Password authentication over TCP, as a real deployment has; run as the ``postgres`` user
    when we are root (PostgreSQL refuses to run as root).
    """

    def __init__(self, data_dir: Path, password: str = "raydata-test-pw", settings: dict[str, str] | None = None):
        self.data_dir = data_dir
        self.port = free_port()
        self.password = password
        self.settings = {"fsync": "off", "max_wal_size": "4GB", **(settings or {})}

    @staticmethod
    def bin_dir() -> Path:
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        if not found:
            raise ServiceUnavailable("PostgreSQL is not installed (apt-get install -y postgresql)")
        return found[-1].parent

    def _run(self, *args: str) -> None:
        cmd = list(args)
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise ServiceUnavailable(f"{args[0]} failed: {result.stdout[-2000:]}{result.stderr[-2000:]}")

    def start(self) -> None:
        bin_dir = self.bin_dir()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        pwfile = self.data_dir.parent / f"{self.data_dir.name}.pw"
        pwfile.write_text(self.password)
        if os.geteuid() == 0:
            import shutil

            for path in (self.data_dir.parent, self.data_dir, pwfile):
                shutil.chown(path, "postgres", "postgres")
        self._run(
            str(bin_dir / "initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            "postgres",
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
            "--no-sync",
        )
        options = " ".join(
            [f"-p {self.port}", f"-k {self.data_dir}", "-c listen_addresses=127.0.0.1"]
            + [f"-c {k}={v}" for k, v in self.settings.items()]
        )
        self._run(
            str(bin_dir / "pg_ctl"),
            "-D",
            str(self.data_dir),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "-l",
            str(self.data_dir / "server.log"),
            "start",
        )

    def stop(self) -> None:
        try:
            self._run(str(self.bin_dir() / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate", "stop")
        except ServiceUnavailable:
            pass

    @property
    def params(self) -> dict:
        return {
            "host": "127.0.0.1",
            "port": self.port,
            "user": "postgres",
            "password": self.password,
            "dbname": "postgres",
        }

    def connection(self) -> dict:
        """An Airflow ``postgres`` connection (JSON form) to this server."""
        return {
            "conn_type": "postgres",
            "host": "127.0.0.1",
            "port": self.port,
            "login": "postgres",
            "password": self.password,
            "schema": "postgres",
        }


class TcpProxy:
    """A TCP forwarder on a free loopback port, to cut a client off from a server on purpose:
    ``stop()`` closes the listener and every forwarded connection; ``start()`` listens again."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
            listener, self._listener = self._listener, None
        for sock in [*sockets, *([listener] if listener else [])]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # stopped
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

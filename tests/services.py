"""Local services for tests and benchmarks: a Ray head started with ``ray start --head``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
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
        self.address = f"ray://127.0.0.1:{self.client_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"

    def start(self) -> None:
        cmd = [
            str(BIN / "ray"),
            "start",
            "--head",
            f"--port={free_port()}",
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

        marker = str(self.temp_dir)
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if any(marker in part for part in proc.info["cmdline"] or []):
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

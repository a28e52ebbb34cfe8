"""Keep a stage executor in a running Ray job on the cluster, and serve its HTTP API:
``python -m airflow_provider_raydata.runtime.service NAME NAMESPACE [--port P --host H --token-sha256 HEX]``.

Submitted once per cluster through the Ray Jobs API by the Airflow side (``hooks.service_jobs``).
Ray keeps worker processes warm only for jobs that are alive; an executor owned by this
never-ending job therefore runs every stage on warm workers (measured here: a small stage's Ray
Data work took 4-14 s on the fresh workers of a finished client job, under 1 s on warm ones).
With ``--port`` it also serves the stage API (``runtime.api``) on the head. Stop the job to retire it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time

import ray

from .api import DEFAULT_PORT, MAX_REQUEST_BYTES, serve
from .executor import StageExecutor


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m airflow_provider_raydata.runtime.service")
    parser.add_argument("name", help="the stage executor's actor name")
    parser.add_argument("namespace")
    parser.add_argument("--port", type=int, default=None, help=f"serve the stage API (usually {DEFAULT_PORT})")
    parser.add_argument("--host", default="127.0.0.1", help="listen address; anything but loopback needs a token")
    parser.add_argument("--token-sha256", default=None, help="SHA-256 (hex) of the bearer token callers present")
    parser.add_argument("--max-request-bytes", type=int, default=MAX_REQUEST_BYTES)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ray.init(namespace=args.namespace)
    executor = StageExecutor.options(name=args.name, namespace=args.namespace, get_if_exists=True).remote()
    print(f"stage executor {args.name} ready in process {ray.get(executor.pid.remote())}", flush=True)
    if args.port is None:
        while True:
            time.sleep(60)
    asyncio.run(serve(executor, args.host, args.port, args.token_sha256, args.max_request_bytes))


if __name__ == "__main__":
    main()

"""Keep a stage executor in a running Ray job on the cluster:
``python -m airflow_provider_raydata.runtime.service NAME NAMESPACE``.

Submitted once per cluster through the Ray Jobs API by RayHook. Ray keeps worker processes
warm only for jobs that are alive; an executor owned by this never-ending job therefore runs
every stage on warm workers (measured here: a small stage's Ray Data work took 4-14 s on the
fresh workers of a finished client job, under 1 s on warm ones). Stop the job to retire it.
"""

from __future__ import annotations

import sys
import time

import ray

from .executor import StageExecutor


def main(name: str, namespace: str) -> None:
    ray.init(namespace=namespace)
    executor = StageExecutor.options(name=name, namespace=namespace, get_if_exists=True).remote()
    print(f"stage executor {name} ready in process {ray.get(executor.pid.remote())}", flush=True)
    while True:
        time.sleep(60)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

"""Apache Airflow provider that runs Ray Data ETL stages on a Ray cluster.

This module must not import Airflow: the cluster side (``runtime``) imports the package too.
"""

from __future__ import annotations

__version__ = "0.1.0"


def get_provider_info() -> dict:
    return {
        "package-name": "airflow-provider-raydata",
        "name": "Ray Data",
        "description": "Run Ray Data ETL stages (extract, transform, quality, load) on a Ray cluster.",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "Ray Data",
                "external-doc-url": "https://docs.ray.io/en/latest/data/data.html",
                "tags": ["software"],
            }
        ],
        "hooks": [{"integration-name": "Ray Data", "python-modules": ["airflow_provider_raydata.hooks.ray"]}],
        "operators": [
            {
                "integration-name": "Ray Data",
                "python-modules": ["airflow_provider_raydata.operators.raydata"],
            }
        ],
        "triggers": [{"integration-name": "Ray Data", "python-modules": ["airflow_provider_raydata.triggers.raydata"]}],
        "extra-links": ["airflow_provider_raydata.operators.raydata.RayDashboardLink"],
        "config": {
            "raydata": {
                "description": "Defaults of the Ray Data operators.",
                "options": {
                    "wait_before_deferring": {
                        "description": "Seconds a deferrable task waits for its stage before it defers: a stage "
                        "that ends sooner finishes in the task, without a trigger or a second task process.",
                        "version_added": "0.1.0",
                        "type": "float",
                        "example": "0",
                        "default": "5",
                    },
                    "stage_lease_seconds": {
                        "description": "On the stage service, a running stage that no request (its task's "
                        "polls, or its trigger's) asked about for this long is cancelled: its task was marked "
                        "failed while deferred before a triggerer picked it up, or its worker died. Longer than "
                        "a triggerer's restart.",
                        "version_added": "0.1.0",
                        "type": "float",
                        "example": "600",
                        "default": "300",
                    },
                },
            }
        },
        "connection-types": [
            {
                "hook-class-name": "airflow_provider_raydata.hooks.ray.RayHook",
                "hook-name": "Ray Data",
                "connection-type": "raydata",
                "conn-fields": {
                    "namespace": {
                        "label": "Ray namespace",
                        "schema": {"type": ["string", "null"]},
                    },
                    "runtime_env": {
                        "label": "Runtime environment (JSON)",
                        "description": 'Ray runtime_env, e.g. {"pip": ["my-etl-lib"]}',
                        "schema": {"type": ["string", "null"]},
                    },
                    "dashboard_url": {
                        "label": "Dashboard URL",
                        "schema": {"type": ["string", "null"]},
                    },
                    "staging_uri": {
                        "label": "Staging URI",
                        "description": "Shared storage for stage outputs, e.g. s3://bucket/raydata-staging",
                        "schema": {"type": ["string", "null"]},
                    },
                    "connect_timeout": {
                        "label": "Connect timeout (seconds)",
                        "schema": {"type": ["integer", "null"], "default": 30},
                    },
                    "storage_options": {
                        "label": "Storage options (JSON)",
                        "description": 'S3 settings for s3:// URIs, e.g. {"endpoint_url": "http://minio:9000", '
                        '"region_name": "eu-west-1"}; an aws connection on the operator is the usual place',
                        "schema": {"type": ["string", "null"]},
                    },
                    "log_to_driver": {
                        "label": "Stream all worker output (Ray Client only)",
                        "description": "Every Ray worker's output in the task log (about 4 s more per stage); "
                        "the stage's own lines are streamed either way",
                        "schema": {"type": ["boolean", "null"], "default": False},
                    },
                },
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "login"],
                    "relabeling": {"host": "Stage service URL or Ray Client host", "password": "Auth token"},
                    "placeholders": {
                        "host": "http://ray-head:8477 (stage service) or ray-head (Ray Client); empty: embedded Ray",
                        "port": "10001",
                        "password": "token for clusters started with RAY_AUTH_MODE=token",
                    },
                },
            }
        ],
    }

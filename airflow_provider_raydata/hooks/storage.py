"""Object-store credentials for the cluster (s3://, gs://) from Airflow's aws and google
connections. Secrets are registered with Airflow's masker."""

from __future__ import annotations

from typing import Any

from airflow.sdk.log import mask_secret


def aws_storage_options(conn_id: str) -> dict[str, Any]:
    """S3 credentials, region and endpoint (MinIO, moto, ...) from an Airflow ``aws`` connection."""
    try:
        from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
    except ImportError as exc:
        raise ImportError("s3:// with aws_conn_id needs: pip install 'airflow-provider-raydata[s3]'") from exc
    hook = AwsBaseHook(aws_conn_id=conn_id, client_type="s3")
    credentials = hook.get_credentials()
    options = {
        "aws_access_key_id": credentials.access_key,
        "aws_secret_access_key": credentials.secret_key,
        "aws_session_token": credentials.token,
        "region_name": hook.conn_config.region_name,
        "endpoint_url": hook.conn_config.get_service_endpoint_url("s3"),
    }
    for secret in (credentials.secret_key, credentials.token):
        if secret:
            mask_secret(secret)
    return {k: v for k, v in options.items() if v}


def gcs_storage_options(conn_id: str) -> dict[str, Any]:
    """A short-lived OAuth access token for gs:// from a ``google_cloud_platform`` connection."""
    try:
        from airflow.providers.google.common.hooks.base_google import GoogleBaseHook
        from google.auth.transport.requests import Request
    except ImportError as exc:
        raise ImportError("gs:// with gcp_conn_id needs: pip install 'airflow-provider-raydata[bigquery]'") from exc
    hook = GoogleBaseHook(gcp_conn_id=conn_id)
    credentials = hook.get_credentials()
    credentials.refresh(Request())
    mask_secret(credentials.token)
    options = {"gcs_access_token": credentials.token, "gcs_project": hook.project_id}
    if credentials.expiry:
        options["gcs_token_expiry"] = credentials.expiry.isoformat()
    return options

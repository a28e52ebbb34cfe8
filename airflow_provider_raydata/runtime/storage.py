"""Map URIs (local paths, file://, s3://, gs://) to pyarrow filesystems (on the cluster, and on
the worker for the runtime code it runs)."""

from __future__ import annotations

import datetime as dt
import fnmatch
from typing import Any

import pyarrow.fs as pafs

from ..contracts import DataError, MissingInputError

GLOB_CHARS = "*?["


def filesystem_for(uri: str, options: dict[str, Any] | None = None) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path)`` for a URI; ``options`` carry S3 endpoint and credentials."""
    options = options or {}
    if uri.startswith("s3://"):
        endpoint = options.get("endpoint_url")
        kwargs: dict[str, Any] = {
            "region": options.get("region_name") or "us-east-1",
            "access_key": options.get("aws_access_key_id"),
            "secret_key": options.get("aws_secret_access_key"),
            "session_token": options.get("aws_session_token"),
        }
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        return pafs.S3FileSystem(**kwargs), uri[len("s3://") :].rstrip("/")
    if uri.startswith("gs://"):
        return gcs_filesystem(options), uri[len("gs://") :].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" in uri:
        raise DataError(f"Unsupported URI scheme in {uri!r}: use a local path, file://, s3:// or gs://")
    return pafs.LocalFileSystem(), uri.rstrip("/") or "/"


def gcs_filesystem(options: dict[str, Any]) -> pafs.GcsFileSystem:
    """gs:// with a short-lived token resolved on the Airflow side (else the cluster's own
    credentials); ``gcs_endpoint`` serves emulators."""
    kwargs: dict[str, Any] = {}
    if options.get("gcs_access_token"):
        expiry = options.get("gcs_token_expiry")
        expires = dt.datetime.fromisoformat(expiry) if expiry else dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
        expires = expires if expires.tzinfo else expires.replace(tzinfo=dt.UTC)  # google-auth's expiry is naive UTC
        kwargs.update(access_token=options["gcs_access_token"], credential_token_expiration=expires)
    if options.get("gcs_project"):
        kwargs["project_id"] = options["gcs_project"]
    if options.get("gcs_endpoint"):
        scheme, _, host = options["gcs_endpoint"].partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    return pafs.GcsFileSystem(**kwargs)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def expand(fs: pafs.FileSystem, path: str, extensions: tuple[str, ...], scheme: str = "") -> list[str]:
    """Expand a file, a directory or a glob into data files; raise ``MissingInputError`` (naming
    the URI: ``scheme`` is its ``s3://`` part, which ``path`` lacks) if nothing matches."""
    if not any(c in path for c in GLOB_CHARS):
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return [path]
        if info.type == pafs.FileType.NotFound:
            raise MissingInputError(f"Source path not found: {scheme}{path}")
        files = [
            f.path
            for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
            if f.type == pafs.FileType.File and _is_data_file(f.path, path, extensions)
        ]
        if not files:
            raise MissingInputError(f"No {'/'.join(extensions)} files under {scheme}{path}")
        return sorted(files)
    base = path[: min(path.find(c) for c in GLOB_CHARS if c in path)].rsplit("/", 1)[0]
    if not exists(fs, base):
        raise MissingInputError(f"Source path not found: {scheme}{base} (from pattern {scheme}{path})")
    files = [
        f.path
        for f in fs.get_file_info(pafs.FileSelector(base, recursive=True))
        if f.type == pafs.FileType.File and fnmatch.fnmatchcase(f.path, path)
    ]
    if not files:
        raise MissingInputError(f"No files match {scheme}{path}")
    return sorted(files)


def _is_data_file(path: str, root: str, extensions: tuple[str, ...]) -> bool:
    # Skip hidden and bookkeeping files (_SUCCESS, .crc, _staging/...) below the root.
    relative = path[len(root) :].lstrip("/")
    if any(part.startswith(("_", ".")) for part in relative.split("/")):
        return False
    return path.endswith(extensions)

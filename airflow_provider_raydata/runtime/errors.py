"""A stage's failure as the Airflow task reports it (on the cluster for the stage service; on
the worker for the Ray Client transport): the user's own exception behind Ray's wrappers, and
whether a retry could help (``contracts.is_data_error``)."""

from __future__ import annotations

import re
from typing import Any

from ..contracts import is_data_error, is_missing_input

_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Invalid|Interrupt)(\(\w+\))?: ")


def root_cause(exc: BaseException) -> str:
    """``Type: message`` of the user's own exception behind Ray's wrappers.

    Ray Data wraps errors from a step in ``UserCodeException`` and the original exception
    survives only in the remote traceback text: take its last exception line from there.
    """
    from ray.exceptions import RayTaskError

    cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
    while cause.__cause__ is not None:
        cause = cause.__cause__
    if type(cause).__name__ != "UserCodeException":
        return f"{type(cause).__name__}: {cause}"
    lines = [line.strip() for line in str(exc).splitlines()]
    raised = [line for line in lines if _EXCEPTION_LINE.match(line) and "UserCodeException" not in line]
    return raised[-1] if raised else f"{type(cause).__name__}: {cause}"


def describe_failure(exc: BaseException) -> dict[str, Any]:
    """What the stage service reports of a failed stage: the cause, whether it is a data error
    (no retry helps), and the remote traceback for the task log."""
    return {
        "message": root_cause(exc),
        "data_error": is_data_error(exc),
        "missing_input": is_missing_input(exc),
        "detail": str(exc)[-20_000:],
    }

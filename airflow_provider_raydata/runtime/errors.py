"""A stage's failure as the Airflow task reports it (on the cluster for the stage service; on
the worker for the Ray Client transport): the user's own exception behind Ray's wrappers, and
whether a retry could help (``contracts.is_data_error``)."""

from __future__ import annotations

import re
from typing import Any

from ..contracts import ARROW_DATA_ERRORS, is_data_error, is_missing_input

_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Invalid|Interrupt)(\(\w+\))?: ")


def root_cause(exc: BaseException) -> str:
    """``Type: message`` of the user's own exception behind Ray's wrappers; our own errors
    (``DataError`` and its kinds) as their message alone: it already says what failed.

    Ray Data wraps errors from a step in ``UserCodeException`` and the original exception
    survives only in the remote traceback text: take its last exception line from there.
    """
    from ray.exceptions import RayTaskError

    cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
    while cause.__cause__ is not None and type(cause).__name__ not in OUR_ERRORS:  # ours say what failed
        cause = cause.__cause__
    if type(cause).__name__ != "UserCodeException":
        kind = type(cause).__name__
        return str(cause) if kind in OUR_ERRORS else f"{kind}: {cause}"
    raised = raised_lines(exc)
    if not raised:
        return f"{type(cause).__name__}: {cause}"
    kind, _, message = raised[-1].partition(": ")
    kind = kind.rsplit(".", 1)[-1]
    return message if kind in OUR_ERRORS else f"{kind}: {message}"


def raised_lines(exc: BaseException) -> list[str]:
    """The ``Type: message`` lines of a (remote) traceback's text, Ray Data's wrapper left out."""
    lines = [line.strip() for line in str(exc).splitlines()]
    return [line for line in lines if _EXCEPTION_LINE.match(line) and "UserCodeException" not in line]


# Our own errors, raised with a message that names what failed; a Ray task that raised one
# keeps only its name (in the remote traceback's text), not the exception.
OUR_ERRORS = ("DataError", "UserFunctionError", "MissingInputError")


def failure_kind(exc: BaseException) -> tuple[bool, bool]:
    """(data error: no retry helps, missing input) for a stage's failure, also when only the
    remote traceback's text tells the exception's type."""
    data, missing = is_data_error(exc), is_missing_input(exc)
    if not (data or missing):
        lines = raised_lines(exc)
        last = lines[-1].partition(":")[0].rsplit(".", 1)[-1] if lines else ""
        data = last in (*OUR_ERRORS, *ARROW_DATA_ERRORS) and last != "MissingInputError"
        missing = last == "MissingInputError"
    return data, missing


def describe_failure(exc: BaseException) -> dict[str, Any]:
    """What the stage service reports of a failed stage: the cause, whether it is a data error
    (no retry helps), and the remote traceback for the task log."""
    data, missing = failure_kind(exc)
    return {"message": root_cause(exc), "data_error": data, "missing_input": missing, "detail": str(exc)[-20_000:]}

"""The stage service's wire format: a ``StageSpec`` and its ``StageResult`` as JSON. Imported by
the Airflow side (``hooks.stage_service``) and by the cluster (``runtime.api``); no Airflow, no Ray.

A spec is ``contracts.to_plain(spec, secrets=True)``: its connection parameters travel in the
request body, the one place they are meant to go, never in a response or a log. A user function
given as a callable (a ``fn`` in a step or a check) travels pickled by value with cloudpickle,
as it does over the Ray Client; a ``"package.module:function"`` string travels as it is.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

from .contracts import StageResult, StageSpec, from_plain, to_plain

PICKLED = "__raydata_pickled__"


def encode_spec(spec: StageSpec) -> dict[str, Any]:
    plain = to_plain(spec, secrets=True)
    plain["steps"] = [_encode_fn(step) for step in plain["steps"]]
    plain["checks"] = [_encode_fn(check) for check in plain["checks"]]
    return plain


def decode_spec(data: dict[str, Any]) -> StageSpec:
    """A spec from a request body. Raises ``contracts.DataError`` naming an unknown field."""
    data = dict(data)
    data["steps"] = [_decode_fn(step) for step in data.get("steps") or ()]
    data["checks"] = [_decode_fn(check) for check in data.get("checks") or ()]
    return from_plain(StageSpec, data)


def encode_result(result: StageResult) -> dict[str, Any]:
    return to_plain(result)  # no connection parameters: a result never carries any


def decode_result(data: dict[str, Any]) -> StageResult:
    return from_plain(StageResult, data)


def _encode_fn(item: dict[str, Any]) -> dict[str, Any]:
    fn = item.get("fn")
    if fn is None or isinstance(fn, str):
        return item
    return {**item, "fn": {PICKLED: _pickle(fn)}}


def _decode_fn(item: dict[str, Any]) -> dict[str, Any]:
    fn = item.get("fn")
    if not (isinstance(fn, dict) and PICKLED in fn):
        return item
    import pickle

    import cloudpickle  # noqa: F401 - the pickle refers to cloudpickle's own helpers

    return {**item, "fn": pickle.loads(base64.b64decode(fn[PICKLED]))}


def _pickle(fn: Callable) -> str:
    import cloudpickle

    from .pickling import register_by_value

    register_by_value(cloudpickle)
    return base64.b64encode(cloudpickle.dumps(fn)).decode()

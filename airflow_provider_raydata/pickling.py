"""How user functions reach the cluster (Airflow worker): by value unless installed."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable


def ship_by_value(fn: Callable | str) -> None:
    """Pickle the code of a user function's module by value, unless it is an installed package.

    Functions defined in a DAG file or a project folder live in modules the cluster cannot
    import (Airflow even loads DAG files under generated names); installed packages are
    expected on the cluster too and stay pickled by reference.
    """
    if isinstance(fn, str):
        return
    module = inspect.getmodule(fn)
    path = getattr(module, "__file__", None)
    if module is None or path is None:
        return
    installed = ("site-packages", "dist-packages", os.path.dirname(os.__file__))
    if not any(marker in path for marker in installed):
        from ray import cloudpickle

        cloudpickle.register_pickle_by_value(module)

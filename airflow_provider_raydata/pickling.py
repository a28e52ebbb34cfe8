"""How user functions reach the cluster (Airflow worker): by value unless installed."""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable
from types import ModuleType

# Modules whose functions are pickled by value: DAG files and project folders the cluster cannot
# import (Airflow even loads DAG files under generated names).
BY_VALUE_MODULES: set[str] = set()


def ship_by_value(fn: Callable | str) -> None:
    """Pickle the code of a user function's module by value, unless it is an installed package
    (installed packages are expected on the cluster too and stay pickled by reference)."""
    if isinstance(fn, str):
        return
    module = inspect.getmodule(fn)
    path = getattr(module, "__file__", None)
    if module is None or path is None:
        return
    installed = ("site-packages", "dist-packages", os.path.dirname(os.__file__))
    if not any(marker in path for marker in installed):
        BY_VALUE_MODULES.add(module.__name__)


def register_by_value(cloudpickle: ModuleType) -> None:
    """Tell a cloudpickle (Ray's vendored one, or the standalone one the HTTP transport uses)
    which modules to pickle by value."""
    for name in BY_VALUE_MODULES:
        if name in sys.modules:
            cloudpickle.register_pickle_by_value(sys.modules[name])

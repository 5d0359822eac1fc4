"""Let a command module be called as its function: ``weightdiff.provenance(...)`` works whether
Python's import system has bound ``weightdiff.provenance`` to the function (the package's lazy
``__getattr__``) or to the module of the same name (after ``import weightdiff.provenance``)."""

from __future__ import annotations

import sys
import types


def callable_module(module_name: str, function_name: str) -> None:
    """Make the module ``module_name`` callable as its ``function_name``."""
    module = sys.modules[module_name]

    class _Module(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return getattr(self, function_name)(*args, **kwargs)

    module.__class__ = _Module

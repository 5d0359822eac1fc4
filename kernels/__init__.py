"""Pure array compute for weightdiff, installed as ``weightdiff.kernels``.

No file, model or name knowledge lives here: every function takes arrays in their
stored dtype (bf16 as uint16 bits, fp8 as uint8 bits) plus dtype names, and returns
numbers. ``reference`` is the float64 numpy specification, ``cpu`` the numba
versions with the same names, ``cuda`` the torch versions.
"""

if __name__ == "kernels":
    # This folder imported as a top-level package: the repository root is on sys.path (`python -m
    # pytest` or an interpreter started there). The PyPI package `kernels` (Hugging Face's, which
    # transformers >= 5.25 requires and imports) must win: load it in our place when it is installed.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = _machinery.PathFinder.find_spec(
        "kernels", [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root])
    if _spec is not None and _spec.loader is not None:
        _module = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _module    # the import statement returns what sys.modules holds
        _spec.loader.exec_module(_module)
    # else: no such package installed; this folder stays an empty, harmless top-level module (raising
    # here broke transformers, which imports whatever find_spec("kernels") finds to read a version)

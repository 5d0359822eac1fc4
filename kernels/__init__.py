"""Pure array compute for weightdiff, installed as ``weightdiff.kernels``.

No file, model or name knowledge lives here: every function takes arrays in their
stored dtype (bf16 as uint16 bits, fp8 as uint8 bits) plus dtype names, and returns
numbers. ``reference`` is the float64 numpy specification, ``cpu`` the numba
versions with the same names, ``cuda`` the torch versions.
"""

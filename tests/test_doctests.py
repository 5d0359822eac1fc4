"""Every worked example in a module docstring runs and gives what it says."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(
    [f"weightdiff.{p.stem}" for p in (ROOT / "weightdiff").glob("*.py") if p.stem != "__main__"]
    + [f"weightdiff.render.{p.stem}" for p in (ROOT / "weightdiff" / "render").glob("*.py")]
    + [f"weightdiff.io.{p.stem}" for p in (ROOT / "weightdiff" / "io").glob("*.py")]
    + [f"weightdiff.kernels.{p.stem}" for p in (ROOT / "kernels").glob("*.py")])


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    if name.endswith(".cuda"):
        pytest.importorskip("torch")
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"

"""Start-up: the CLI module and `--help` load neither numpy nor numba (issue 15, item 6)."""

from __future__ import annotations

import subprocess
import sys


def test_the_cli_module_and_help_import_no_array_library():
    code = ("import sys\nfrom weightdiff.cli import main\n"
            "try:\n    main(['--help'], standalone_mode=False)\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in ('numpy', 'numba', 'matplotlib', 'torch', 'weightdiff.comparison')"
            " if m in sys.modules)\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out, out[-500:]


def test_provenance_options_are_the_same_class_everywhere():
    from weightdiff.options import ProvenanceOptions
    from weightdiff.provenance import ProvenanceOptions as again

    assert again is ProvenanceOptions and ProvenanceOptions().full_top == 3


def test_the_repository_kernels_folder_never_shadows_the_pypi_package():
    """`python -m pytest` from the repository root puts it on sys.path, so `import kernels` found our
    kernels/ folder; transformers >= 5.25 imports Hugging Face's `kernels` package and failed (80
    tests, "cannot import name 'CUDAProperties' from 'kernels'"). Ours steps aside."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = ("import os, sys\ntry:\n    import kernels\nexcept ModuleNotFoundError:\n    print('absent')\n"
            "else:\n    print('ours' if os.path.dirname(os.path.abspath(kernels.__file__)) == os.path.join("
            "os.getcwd(), 'kernels') else 'pypi')\nimport weightdiff.kernels.reference\nprint('weightdiff ok')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    from importlib.util import find_spec
    import importlib.metadata as md
    try:
        md.version("kernels")
        want = "pypi"                            # Hugging Face's package is installed: it must win
    except md.PackageNotFoundError:
        want = "ours"                            # nothing to step aside for: the folder stays harmless
    assert out.stdout.split() == [want, "weightdiff", "ok"], out.stdout
    assert find_spec("weightdiff.kernels") is not None

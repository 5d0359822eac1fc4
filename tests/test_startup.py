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

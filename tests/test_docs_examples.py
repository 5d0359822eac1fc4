"""The Python examples in docs/python-api.md run, in order, and their assertions hold."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_python_api_examples_run(tmp_path, capsys):
    text = (ROOT / "docs" / "python-api.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 4
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        scope: dict = {}
        for block in blocks:
            exec(compile(block, "docs/python-api.md", "exec"), scope)
    finally:
        os.chdir(cwd)
    assert (tmp_path / "memo.html").is_file() and (tmp_path / "figures").is_dir()
    assert "derived 3 8" in capsys.readouterr().out

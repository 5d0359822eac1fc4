"""Rebuild docs/example/ and the README's example output from a fresh `weightdiff demo`.

Usage: python scripts/refresh_example.py
tests/test_demo.py checks that the README's example output is what the demo prints today.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # the run date the memo prints: the last commit's, so the example is reproducible
        epoch = subprocess.run(["git", "log", "-1", "--format=%ct"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip() or "0"
        env = dict(os.environ, SOURCE_DATE_EPOCH=os.environ.get("SOURCE_DATE_EPOCH", epoch))
        subprocess.run([sys.executable, "-m", "weightdiff.cli", "demo", "weightdiff-demo", "-q"], cwd=tmp,
                       check=True, env=env, stdout=subprocess.DEVNULL)
        out = Path(tmp) / "weightdiff-demo"
        ex = ROOT / "docs" / "example"
        for name in ("memo.md", "memo.html", "out.json", "ground_truth.json"):
            shutil.copyfile(out / name, ex / name)
        for png in sorted((out / "plots").glob("*.png")):
            shutil.copyfile(png, ex / "plots" / png.name)
    import json

    from weightdiff.render.terminal import render_text

    data = json.loads((ROOT / "docs" / "example" / "out.json").read_text())
    block = render_text(data)
    readme = (ROOT / "README.md").read_text()
    readme = re.sub(r"<!-- demo-output -->\n.*?<!-- /demo-output -->",
                    lambda m: "<!-- demo-output -->\n```\n$ weightdiff demo weightdiff-demo\n" + block + "```\n"
                              "<!-- /demo-output -->", readme, flags=re.S)
    (ROOT / "README.md").write_text(readme)
    print("refreshed docs/example and the README's example output")


if __name__ == "__main__":
    main()

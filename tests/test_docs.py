"""The docs stay in step with the code: CLI reference, README commands, module layering."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_cli_reference_is_generated_from_current_help():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "scripts" / "gen_cli_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert (ROOT / "docs" / "cli.md").read_text() == mod.render(), \
        "docs/cli.md is stale: run python scripts/gen_cli_docs.py"


def test_every_command_has_an_example_block():
    from weightdiff.cli import main

    for name, cmd in main.commands.items():
        assert "Example:" in (cmd.help or ""), f"`weightdiff {name} --help` has no Example: block"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- test-command -->\n```\n(.+?)\n```\n<!-- /test-command -->", readme, re.S)
    assert block, "README lost its marked test command"
    assert "pytest" in block.group(1)
    ci = (ROOT / ".ci" / "run").read_text()
    assert "test-command" in ci


# the module map of STYLE.md: a module may import only from modules above it
ORDER = ["errors", "fileio", "options", "fsutil", "kernels", "safetensors_write", "safetensors_io", "adapter",
         "pickle_io", "checkpoint", "blocknames", "pairing", "records", "rank", "verdict", "aggregate",
         "compute", "comparison", "relatedness", "permutation", "provenance", "lineage", "render", "report",
         "demo", "inspect", "cluster", "split", "survey", "cli"]


def _layer(module: str) -> int | None:
    parts = module.split(".")
    for p in parts:
        if p in ORDER:
            return ORDER.index(p)
    return None


def test_modules_import_only_from_layers_above():
    problems = []
    for path in sorted((ROOT / "weightdiff").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py")):
        rel = path.relative_to(ROOT)
        me = "kernels" if rel.parts[0] == "kernels" else (rel.parts[1] if len(rel.parts) > 2 else rel.stem)
        mine = _layer(me)
        if mine is None:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0 and node.module:
                target = node.module
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("weightdiff."):
                target = node.module[len("weightdiff."):]
            else:
                continue
            theirs = _layer(target)
            if theirs is not None and theirs > mine:
                problems.append(f"{rel} imports {target}")
    assert not problems, problems


def test_readme_links_point_to_files():
    readme = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#]+)\)", readme):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README links to a missing {target}"

"""The docs stay in step with the code: CLI reference, README commands, module layering."""

from __future__ import annotations

import ast
import importlib.util
import io
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


# The stage order of docs/dev/contracts.md: a module imports only from its own stage or lower ones.
STAGES = ["kernels", "foundation", "io", "pairing", "measure", "judge", "render", "commands", "package"]
FOUNDATION = {"errors", "options", "records", "fsutil", "_version"}


def stage_of(module: str) -> str | None:
    """The stage of a dotted module name under ``weightdiff`` (``weightdiff.io.checkpoint`` -> ``io``)."""
    parts = module.split(".")
    if parts[0] != "weightdiff":
        return None
    if len(parts) == 1:
        return "package"
    head = parts[1]
    if head in STAGES:
        return head
    if head in FOUNDATION:
        return "foundation"
    return "commands"


def module_of(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[0] == "kernels":
        parts[0:1] = ["weightdiff", "kernels"]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(module: str, is_package: bool, source: str, top_level_only: bool = False) -> list[str]:
    """Every weightdiff module a source imports, resolved (``from . import X`` included)."""
    package = module if is_package else module.rsplit(".", 1)[0]
    tree = ast.parse(source)
    nodes = tree.body if top_level_only else ast.walk(tree)
    out = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("weightdiff"):
                continue
            out.append(target)
            # `from pkg import sub`: sub may be a module of its own
            out.extend(f"{target}.{a.name}" for a in node.names if a.name != "*")
        elif isinstance(node, ast.Import):
            out.extend(a.name for a in node.names if a.name.startswith("weightdiff"))
    return out


def layering_problems(files: dict[Path, str], only: Path | None = None) -> list[str]:
    """Upward imports (and any import from weightdiff inside kernels/) among ``files`` (path -> source); of the
    file ``only`` alone when given (the others still name the modules that exist)."""
    known = {module_of(p) for p in files}
    problems = []
    for rel, source in sorted(files.items()):
        if only is not None and rel != only:
            continue
        me = module_of(rel)
        mine = stage_of(me)
        for target in imports_of(me, rel.name == "__init__.py", source):
            if target not in known and target.rsplit(".", 1)[0] in known and target.count("."):
                target = target.rsplit(".", 1)[0]          # `from .x import name`: the module is x
            if mine == "kernels" and not target.startswith("weightdiff.kernels"):
                problems.append(f"{rel} imports {target} (kernels import nothing from weightdiff)")
                continue
            theirs = stage_of(target)
            if theirs is not None and STAGES.index(theirs) > STAGES.index(mine):
                problems.append(f"{rel} ({mine}) imports {target} ({theirs})")
    return problems


def _tree() -> dict[Path, str]:
    paths = sorted((ROOT / "weightdiff").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))
    return {p.relative_to(ROOT): p.read_text() for p in paths}


def test_modules_import_only_from_their_stage_or_below():
    assert layering_problems(_tree()) == []


def test_layering_check_catches_planted_upward_imports():
    tree = _tree()
    planted = {
        Path("weightdiff/io/checkpoint.py"): "from ..judge import verdict\n",          # io -> judge
        Path("weightdiff/comparison.py"): "from . import __version__\n",              # commands -> package
        Path("weightdiff/judge/verdict.py"): "from ..render import sentences\n",       # judge -> render
        Path("kernels/cpu.py"): "from weightdiff.errors import OptionsError\n",        # kernels -> weightdiff
        Path("weightdiff/measure/compute.py"): "import weightdiff.judge.status\n",     # measure -> judge
    }
    for path, line in planted.items():
        mutated = dict(tree)
        mutated[path] = tree[path] + "\n" + line
        assert not layering_problems(tree, only=path)
        assert layering_problems(mutated, only=path), f"planted `{line.strip()}` in {path} was not caught"


def test_no_import_cycles_at_module_level():
    tree = _tree()
    graph = {}
    for rel, source in tree.items():
        me = module_of(rel)
        graph[me] = {t for t in imports_of(me, rel.name == "__init__.py", source, top_level_only=True)
                     if t != me and t in {module_of(p) for p in tree}}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [node, nxt]))
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_readme_links_point_to_files():
    readme = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#]+)\)", readme):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README links to a missing {target}"


def test_the_unrelated_thresholds_are_compared_in_one_module_only():
    """The unrelated rule has one home (judge/relatedness.py): nowhere else compares its thresholds."""
    homes = set()
    for path in sorted((ROOT / "weightdiff").rglob("*.py")):
        for line in path.read_text().splitlines():
            if re.search(r"[<>]=?\s*\w*\.?unrelated_(cosine|rel_change)|unrelated_(cosine|rel_change)\s*[<>]", line):
                homes.add(str(path.relative_to(ROOT)))
    assert homes == {"weightdiff/judge/relatedness.py"}, homes


def _undefined_names(paths) -> list[str]:
    from pyflakes import api, messages
    from pyflakes.reporter import Reporter

    found: list[str] = []

    class Collect(Reporter):
        def __init__(self):
            super().__init__(io.StringIO(), io.StringIO())

        def flake(self, message):
            if isinstance(message, (messages.UndefinedName, messages.UndefinedLocal, messages.UndefinedExport)):
                found.append(str(message))

    for p in paths:
        api.checkRecursive([str(p)], Collect())
    return found


def test_no_module_uses_a_name_it_never_defines_or_imports(tmp_path):
    """`--device cuda` failed on every compare with NameError: kernels/cuda_stream.py called `as_storage`
    without importing it, on a path no CPU test reaches. pyflakes finds such names statically, in every
    module, whatever the machine can run."""
    root = Path(__file__).resolve().parent.parent
    assert _undefined_names([root / "weightdiff", root / "kernels"]) == []
    planted = tmp_path / "planted.py"
    planted.write_text("def f(x):\n    return as_storage(x)\n")
    assert len(_undefined_names([planted])) == 1


def test_the_schema_doc_gives_settings_backend_as_written():
    # json-schema.md said `cpu` or `cuda`, every result holds `numba` (a pipeline switching on the doc never matched)
    from weightdiff.options import CompareOptions

    text = (Path(__file__).resolve().parent.parent / "docs" / "json-schema.md").read_text()
    line = next(x for x in text.splitlines() if x.startswith("| `settings` |"))
    backend = line[line.index("`backend`"):]
    backend = backend[:backend.index(")")]
    assert f"`{CompareOptions(device='cpu').settings()['backend']}`" in backend
    assert f"`{CompareOptions(device='cuda').settings()['backend']}`" in backend
    assert "`cpu` or `cuda`" not in backend

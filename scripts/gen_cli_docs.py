"""Regenerate docs/cli.md from the commands' --help (tests/test_docs.py checks it is current).

Usage: python scripts/gen_cli_docs.py [--check]
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from weightdiff.cli import main

OUT = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def render() -> str:
    parts = ["# Command-line reference", "",
             "Generated from `--help` by `python scripts/gen_cli_docs.py`; do not edit by hand.", ""]
    # the same context settings as a real invocation (click caches each command's help option)
    ctx = click.Context(main, info_name="weightdiff", terminal_width=100, max_content_width=100,
                        help_option_names=["-h", "--help"])
    parts += ["## weightdiff", "", "```", main.get_help(ctx), "```", ""]
    for name in sorted(main.commands):
        cmd = main.commands[name]
        sub = click.Context(cmd, info_name=f"weightdiff {name}", parent=ctx, terminal_width=100,
                            max_content_width=100, help_option_names=["-h", "--help"])
        parts += [f"## weightdiff {name}", "", "```", cmd.get_help(sub), "```", ""]
    return "\n".join(parts)


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if OUT.exists() and OUT.read_text() == text else 1)
    OUT.write_text(text)
    print(f"wrote {OUT}")

"""Regenerate docs/cli.md from the commands' --help (tests/test_docs.py checks it is current).

Usage: python scripts/gen_cli_docs.py [--check]
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from weightdiff.cli import main

OUT = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


FIXED = """## Exit codes

| code | meaning |
|------|---------|
| 0 | the work is done, whatever it found (differences are a result, not a failure) |
| 1 | an unexpected error inside weightdiff: one line on stderr; please report it |
| 2 | bad input or usage: one line on stderr naming the file or flag, and nothing written; also a Dask scheduler (`--scheduler`) that cannot be reached (nothing written) or that is lost during the run (a survey keeps the rows it completed, and a rerun compares the others) |
| 130 | interrupted (Ctrl-C; with `--workers N`, also while the Dask cluster starts: held until it is up, then acted on, and the workers never see it. A process started with SIGINT or SIGTERM ignored, a shell's background job, keeps ignoring it) |
| 143 | terminated (SIGTERM, as a job scheduler or `timeout` sends it): like an interrupt, nothing written, a `--cache` keeps the records already measured |

All outputs of a command appear together or not at all. Every path is claimed before any work: the
same path for two outputs (counting each figure file and `figures.json` that `--plots DIR` or a
Markdown memo's figure folder will hold, and the `--cache` folder), an output inside another output
that is a file, or an output over an input (a weights file, or a checkpoint's `config.json`,
`params.json`, `adapter_config.json`, index, tokenizer files or README) is exit 2 with nothing written.
Each output is written to a
temporary beside it (`.NAME.PID.XXXXXXXX.tmp`) and renamed into place once every one is complete:
every destination is checked first, and a rename that fails part way puts back the files already
replaced (kept as hard links until the end; on a filesystem without hard links a replaced file cannot
come back). Ctrl-C or SIGTERM while the files are renamed into place is held until they are all put
back: an interrupted run leaves the previous outputs, never some old and some new (a signal that arrives once
every output is in place is held and dropped: the command completes, exit 0). An interrupted or
failed run removes its temporaries (a `--cache` record being written included). A run killed outright
(SIGKILL, a power cut) cannot, and the next run that writes the same output removes what it left
(temporaries of a process that no longer exists; for `--cache`, the next run that opens the cache).

## Environment variables

| variable | effect |
|----------|--------|
| `WEIGHTDIFF_DEBUG=1` | on an unexpected error (exit 1), print the full Python traceback instead of one line |
| `SOURCE_DATE_EPOCH` | the run date recorded in the JSON's `run.date` and printed in the memo (reproducible builds) |
| `HF_HUB_ETAG_TIMEOUT` | Hub repo ids: seconds (default 10) each Hub API call (model info, file listing, branches and tags, a file's HEAD) may wait to connect and for each read of the answer; past it, one line "did not answer within N s (timed out)", exit 2 |
| `WEIGHTDIFF_HUB_API_SECONDS` | Hub repo ids: seconds (default 60) one Hub API answer may take as a whole, from its request to its last byte (a server trickling a byte at a time keeps each read inside `HF_HUB_ETAG_TIMEOUT`); past it, one line naming the repo and the endpoint, exit 2 |
| `HF_HUB_DOWNLOAD_TIMEOUT` | Hub repo ids: seconds (default 10) a download or a streamed range request may wait for its next bytes |
| `WEIGHTDIFF_HUB_STALL_SECONDS` | Hub repo ids: every download and range request must bring 64 KiB within each window of this many seconds (default 60; about 1 KiB/s, which any real connection passes); a server that trickles bytes below that pace stops the run with one line naming the file, exit 2 |
| `WEIGHTDIFF_PRECOMPILE` | where numba's kernels are compiled on a first run (after installing or upgrading). Unset: a comparison of at least a billion elements a side, or with a matrix at least 4,096 wide on its smaller side, compiles the kernels of its dtype pairs in a child process that writes numba's cache, so the compiler's memory (about 100 MB per parallel kernel) leaves with the child and the comparison only loads the machine code; a smaller one compiles in its own process (faster on a first run, far from the memory bound). `1`: a child for any size; `0`: never. A marker beside numba's cache (`NUMBA_CACHE_DIR` or the package's `__pycache__`) means later runs start no child |
| `NUMBA_CACHE_DIR` | where numba keeps the compiled kernels (numba's own variable). Unset, numba uses the package's `__pycache__` or `~/.cache/numba`, whichever it can write; where it can write neither (a read-only install run by a user without a writable home), weightdiff sets it to `<tmp>/weightdiff-numba-<uid>` (mode 0700, used only when owned by the user and writable by nobody else; else a folder for the one run) so a later run loads what a first one compiled |

## Shell completion

weightdiff completes its commands and options through click. Add one line to your shell's start-up file:

```
eval "$(_WEIGHTDIFF_COMPLETE=bash_source weightdiff)"      # ~/.bashrc
eval "$(_WEIGHTDIFF_COMPLETE=zsh_source weightdiff)"       # ~/.zshrc
_WEIGHTDIFF_COMPLETE=fish_source weightdiff | source      # ~/.config/fish/completions/weightdiff.fish
```

""".splitlines()


def render() -> str:
    parts = ["# Command-line reference", "",
             "Generated from `--help` by `python scripts/gen_cli_docs.py`; do not edit by hand.", ""]
    # the same context settings as a real invocation (click caches each command's help option)
    ctx = click.Context(main, info_name="weightdiff", terminal_width=100, max_content_width=100,
                        help_option_names=["-h", "--help"])
    parts += ["## weightdiff", "", "```", main.get_help(ctx), "```", ""]
    parts += FIXED
    for name in sorted(main.commands):
        cmd = main.commands[name]
        sub = click.Context(cmd, info_name=name, parent=ctx, terminal_width=100,
                            max_content_width=100, help_option_names=["-h", "--help"])
        parts += [f"## weightdiff {name}", "", "```", cmd.get_help(sub), "```", ""]
    return "\n".join(parts)


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if OUT.exists() and OUT.read_text() == text else 1)
    OUT.write_text(text)
    print(f"wrote {OUT}")

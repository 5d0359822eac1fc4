"""The ``weightdiff`` command line: click parsing over one library call per command.

Results go to stdout, progress and diagnostics to stderr. Exit codes: 0 when the
work is done (differences are a result, not a failure), 2 for bad input or usage,
1 for an unexpected error.
"""

from __future__ import annotations

import sys

import click

from . import __version__
from .errors import WeightdiffError, escape_name


class _Group(click.Group):
    """Turns WeightdiffError into one line on stderr and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except WeightdiffError as exc:
            click.echo(f"error: {exc.one_line()}", err=True)
            sys.exit(exc.exit_code)
        except (KeyboardInterrupt, BrokenPipeError):
            sys.exit(130)


CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="weightdiff")
def main() -> None:
    """Measure how deep a fine-tune is: weightdiff pairs a base checkpoint with a
    fine-tuned one and reports, tensor by tensor and block by block, how much the
    weights changed and the rank of each change.

    It answers "how slight is this fine-tune?" with numbers, a verdict (identical,
    cast_only, derived, unrelated), plots and a memo, read straight from safetensors
    files without loading whole models.
    """


# --- inspect -----------------------------------------------------------------

# --- compare -----------------------------------------------------------------

# --- report ------------------------------------------------------------------

# --- demo --------------------------------------------------------------------

# --- provenance --------------------------------------------------------------


if __name__ == "__main__":  # pragma: no cover
    main()

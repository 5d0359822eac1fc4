"""Errors weightdiff raises on purpose: the one place their wording is decided.

Every error a user can cause (a bad path, a malformed file, a bad option) is a
``WeightdiffError``: the CLI prints ``error: <message>`` as one line on stderr and
exits with code 2; anything else is a bug and exits 1. Messages are lower case,
name the object (a path, or a tensor name in backticks), say what was expected and
what was found, and end with one fix in parentheses where there is one:

    tuned/model.safetensors: header declares 4,194,304 bytes of tensor data but the
    file holds 4,000,000 (truncated download?)
"""

from __future__ import annotations

import os
import re

__all__ = [
    "WeightdiffError",
    "redact_url",
    "CheckpointError",
    "OptionsError",
    "OutputError",
    "UsageProblem",
    "escape_name",
    "terminal_safe",
]


#: the longest error line printed; the middle of a longer one is left out (its start names the file)
LINE_MAX = 2000


#: the user:password@ of a URL (a mirror's HF_ENDPOINT, a proxy): never printed, nor written into a survey
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@")


def redact_url(text: str) -> str:
    """``text`` with the credentials of any URL in it replaced by ``***``.

    >>> redact_url("cannot reach http://user:s3cret@mirror:8080/api")
    'cannot reach http://***@mirror:8080/api'
    """
    return _USERINFO.sub(r"\1***@", text) if "@" in text else text


class WeightdiffError(Exception):
    """A problem with the user's input or request (exit code 2 in the CLI)."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        self.message = redact_url(message)
        self.hint = None if hint is None else redact_url(hint)
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = self.message if not self.hint else f"{self.message} ({self.hint})"
        # never let a newline from a file name or header split the one-line contract
        text = escape_name(text, keep_quotes=True)
        if len(text) > LINE_MAX:          # a hostile name or a shape of 100,000 dimensions: one readable line
            text = f"{text[:LINE_MAX - 300]} ... [{len(text) - LINE_MAX + 300:,} characters left out] ... {text[-250:]}"
        return text


class CheckpointError(WeightdiffError):
    """A checkpoint path or file cannot be read or is malformed."""

    def __init__(self, path: str | os.PathLike | None, problem: str, hint: str | None = None):
        self.path = None if path is None else os.fspath(path)
        message = problem if self.path is None else f"{self.path}: {problem}"
        super().__init__(message, hint)


class OptionsError(WeightdiffError):
    """An option value the library cannot honour.

    ``option`` names the option as the library spells it (a ``CompareOptions`` field such
    as ``rank_k``); the message starts with that name. The library never names a CLI
    flag: the CLI rewrites the name into its flag (``--rank-k``) at its edge.
    """

    def __init__(self, message: str, hint: str | None = None, option: str | None = None):
        self.option = option
        super().__init__(message, hint)


class OutputError(CheckpointError):
    """An output file cannot be written (exit code 2: the user chose the path)."""


class UsageProblem(WeightdiffError):
    """Bad command-line usage that click itself cannot detect (exit code 2)."""


def escape_name(text: str, keep_quotes: bool = True) -> str:
    """Make text safe to print on one terminal line.

    Control characters, line breaks and bidirectional overrides are written as
    escapes (``\\n``, ``\\x1b``, ``\\u202e``) so that a hostile tensor or file name can
    neither break the one-line error contract nor reorder what the reader sees.

    >>> escape_name("a\\nb\\u202ec")
    'a\\\\nb\\\\u202ec'
    """
    out = []
    for ch in text:
        o = ord(ch)
        if ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif o < 0x20 or o == 0x7F or 0x80 <= o < 0xA0:
            out.append(f"\\x{o:02x}")
        elif o in _BIDI or o in _INVISIBLE or 0xD800 <= o <= 0xDFFF or 0xE0000 <= o <= 0xE007F:
            out.append(f"\\u{o:04x}" if o <= 0xFFFF else f"\\U{o:08x}")
        else:
            out.append(ch)
    return "".join(out)


def terminal_safe(text: str) -> str:
    r"""Multi-line text (JSON, CSV) made safe for a terminal: every control character but the
    line feed, every bidi override and lone surrogate becomes a ``\uXXXX`` escape. Inside JSON
    strings that is the same string, so the JSON stays valid and means the same.

    >>> print(terminal_safe('{"a\u202e": 1}'))
    {"a\u202e": 1}
    """
    if text.isascii() and text.isprintable():
        return text
    return "".join(f"\\u{o:04x}" if (o < 0x20 and o != 0x0A) or 0x7F <= o < 0xA0 or o in _BIDI or o in _INVISIBLE
                   or 0xD800 <= o <= 0xDFFF else ch for ch, o in ((c, ord(c)) for c in text))


_BIDI = {0x061C, 0x200E, 0x200F, 0x202A, 0x202B, 0x202C, 0x202D, 0x202E,
         0x2066, 0x2067, 0x2068, 0x2069, 0x2028, 0x2029, 0xFEFF}
#: characters that print as nothing (zero-width space and joiners, word joiner, invisible
#: operators, soft hyphen, fillers): a name holding one looks like another name (tag characters,
#: U+E0000-U+E007F, are escaped beside these)
_INVISIBLE = {0x00AD, 0x115F, 0x1160, 0x180E, 0x200B, 0x200C, 0x200D, 0x2060, 0x2061, 0x2062, 0x2063, 0x2064,
              0x3164, 0xFFA0}

"""The one output filter for stored text shown on a page or a terminal.

Why: the tracker refuses control characters in what devices send, but a row
can reach the database another way (an older row, a migration, another
writer). Whatever is stored, no page and no terminal line may carry it raw: an
ESC sequence could clear or rewrite a technician's screen, a bidi override
could make a name read as another, a lone surrogate would leave the relay's
`surrogateescape` channel as a raw 8-bit byte (0x9b is a C1 CSI).

Which characters: those `str.isprintable()` calls non-printable, that is the
Unicode categories Cc (C0 controls, DEL, C1 controls), Cf (bidi marks,
embeddings, overrides and isolates, zero-width space/joiners, word joiner,
BOM, soft hyphen), Cs (lone surrogates), Co (private use), Cn (unassigned),
Zl/Zp (line and paragraph separators) and Zs other than the ASCII space (no-
break and other look-alike spaces). Each becomes a visible escape: `\\xNN`
below U+0100, `\\uNNNN` in the BMP, `\\UNNNNNNNN` above; a backslash itself
is left alone (the escape is for reading, not for decoding back).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any, TextIO


def escape_char(ch: str) -> str:
    """The visible escape of one character."""
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(value: str) -> str:
    """`value` with every non-printable character (see above) as a visible escape."""
    if value.isprintable():  # the common case, checked in C
        return value
    return "".join(ch if ch.isprintable() else escape_char(ch) for ch in value)


def printable_lines(text: str) -> str:
    """Like `printable`, but keeps the line breaks ("\\n") of text that has several lines."""
    return "\n".join(printable(line) for line in text.split("\n"))


def finalize(value: Any) -> Any:
    """Jinja2 `finalize` hook: every `{{ }}` string is filtered before autoescaping.

    Markup (HTML the code built itself, such as the QR code's SVG) stays Markup and
    keeps its line breaks; plain strings are values and keep nothing.
    """
    if isinstance(value, str) and hasattr(value, "__html__"):  # markupsafe.Markup
        return type(value)(printable_lines(str(value)))  # only escapes are added
    if isinstance(value, str):
        return printable(value)
    return value


class PrintableWriter:
    """A text stream that passes everything written through `printable_lines`."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(printable_lines(text))
        return len(text)

    def __getattr__(self, name: str) -> Any:  # flush, isatty, encoding, fileno, ...
        return getattr(self._stream, name)


@contextlib.contextmanager
def printable_output() -> Iterator[None]:
    """Filter sys.stdout and sys.stderr (a CLI's print calls) while the block runs."""
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = PrintableWriter(out), PrintableWriter(err)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = out, err

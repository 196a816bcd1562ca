"""User data shown as text: never as Rich markup, never as terminal control sequences.

A batch name, a CSV header or a step name comes from a file or a Studio user. Printed as a Rich
string, ``[red]file.csv`` loses its brackets (markup) and ``\\x1b[2J`` clears the screen; shown
through :func:`literal` both read exactly as typed, controls as visible escapes.
"""

from __future__ import annotations

import unicodedata

from rich.text import Text

# Cc: C0/C1 controls (ESC, CR, BEL...); Cf: format characters (bidi overrides that reorder a line).
_HIDDEN = frozenset({"Cc", "Cf"})


def visible(value: str) -> str:
    """``value`` with every control or format character written as ``\\xNN`` / ``\\uNNNN``."""
    if value.isprintable():
        return value
    return "".join(
        (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        if unicodedata.category(ch) in _HIDDEN
        else ch
        for ch in value
    )


def literal(value: str, style: str = "") -> Text:
    """A Rich ``Text`` of ``value`` as typed: brackets stay brackets, controls become visible."""
    return Text(visible(value), style=style)

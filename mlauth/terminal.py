"""Text from stores and files, made safe to show on a terminal.

What ``mlauth status`` and the stderr lines print comes partly from places anyone who can
write the store may fill: a Redis hash's ``refreshed_by``, the ``.env``'s
``ML_TOKEN_REFRESHED_BY``, the journal and its marker, a path. Printed as they are, an escape
sequence there clears the screen, retitles the window, hides the rest of the line or fakes a
row, and a file name that is not UTF-8 (a surrogate, once decoded) makes ``print`` raise.
"""

from __future__ import annotations

import unicodedata

__all__ = ["is_unsafe", "printable"]

# C0, DEL and C1 (Cc); bidi overrides and zero-width marks (Cf), which reorder or hide what
# follows; line and paragraph separators, which some terminals break lines on; surrogates
# (undecodable bytes of a path), private-use and unassigned code points.
_UNSAFE = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def is_unsafe(char: str) -> bool:
    """Whether a terminal (or a reader splitting lines) may act on ``char``."""
    return unicodedata.category(char) in _UNSAFE


def printable(text: str) -> str:
    """``text`` with each character a terminal would act on shown as its escape (``\\x1b``).

    Escaped, not dropped: an operator should see that a value holds something odd. An ANSI
    sequence loses its ESC (or CSI) and so is printed as inert text (``\\x1b[2J``).
    """
    if text.isprintable():  # the common case, in one pass
        return text
    return "".join(ascii(char)[1:-1] if is_unsafe(char) else char for char in text)

"""Strings from outside made safe for a terminal.

A colleague's patient name, subject, letter and file names, a directory's
practitioner names, a peer's error message: any of them may hold escape
sequences (which a terminal obeys: move the cursor, rewrite the screen, set
the window title) or bidirectional overrides (which make text read other than
it is stored). Every such string goes through `shown()` before it is printed:
control and format characters become visible escapes such as `\\x1b`.
"""

from __future__ import annotations

import unicodedata

_BIDI = {chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C)}


def _visible(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def shown(text: object, *, lines: bool = False) -> str:
    """`text` with every control, format or bidi character escaped; newlines and tabs kept if `lines`."""
    out = []
    for ch in str(text):
        if lines and ch in "\n\t":
            out.append(ch)
        elif ch in _BIDI or unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            out.append(_visible(ch))
        else:
            out.append(ch)
    return "".join(out)

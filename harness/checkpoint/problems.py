"""How bad checkpoint input is reported: one `CheckpointError`, one line, nothing forged.

Keys and file names come from untrusted files; printed raw, a newline in one would forge extra
lines in a log, an escape sequence would drive the terminal. `shown()` escapes every control
and format character (bidi overrides included), so a message stays one honest line.
`control_character()` finds one (results files refuse names holding any) and `brief()` shows
an untrusted value in a message at a bounded length and depth.
"""

from __future__ import annotations

import reprlib
import unicodedata

from ..errors import HarnessError


class CheckpointError(HarnessError):
    """Bad checkpoint input; the message is one line naming the file and the fault."""


# Control, format (bidi overrides, zero-width) and line/paragraph separator characters: what
# would break a line or drive a terminal.
_ESCAPED = ("Cc", "Cf", "Zl", "Zp")


def shown(text: object) -> str:
    """`text` with control/format characters escaped (\\n, \\x1b, \\u202e, ...)."""
    out = []
    for ch in str(text):
        if unicodedata.category(ch) in _ESCAPED:
            code = ord(ch)
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(ch)
                       or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"))
        else:
            out.append(ch)
    return "".join(out)


def control_character(text: str) -> str | None:
    """The first character of `text` that shown() would escape, or a lone surrogate (no
    UTF-8 can hold it); None when there is none."""
    if text.isprintable():  # the common case, at C speed: printable text holds none of them
        return None
    return next((ch for ch in text if unicodedata.category(ch) in (*_ESCAPED, "Cs")), None)


_BRIEF = reprlib.Repr()
_BRIEF.maxstring = _BRIEF.maxother = 80
_BRIEF.maxlevel = 2


def brief(value: object) -> str:
    """repr() of an untrusted value for a message: at most ~80 characters and 2 levels deep, so
    a megabyte string or a deeply nested list costs neither the line nor the stack."""
    return _BRIEF.repr(value)

"""How bad checkpoint input is reported: one `CheckpointError`, one line, nothing forged.

Keys and file names come from untrusted files; printed raw, a newline in one would forge extra
lines in a log, an escape sequence would drive the terminal. `shown()` escapes every control
and format character (bidi overrides included), so a message stays one honest line.
"""

from __future__ import annotations

import unicodedata

from ..errors import HarnessError


class CheckpointError(HarnessError):
    """Bad checkpoint input; the message is one line naming the file and the fault."""


def shown(text: object) -> str:
    """`text` with control/format characters escaped (\\n, \\x1b, \\u202e, ...)."""
    out = []
    for ch in str(text):
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            code = ord(ch)
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(ch)
                       or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"))
        else:
            out.append(ch)
    return "".join(out)

"""The launcher's child side: `python -P -m harness.bench.child MODULE:FUNCTION ARGS_JSON` calls
the function with the JSON list's items as its arguments, in this fresh process. It exits 0
when the function returns; an exception prints its traceback to stderr and exits 1, as any
Python program does.

Only the standard library is imported here, never the parent's side (launcher.py, measure.py):
this is the process being measured, so whatever it imports besides the function's own module
counts against the work (measured here: importing measure.py costs a child ~35 ms, which a raw
copy's floor should not pay).
"""

from __future__ import annotations

import importlib
import json
import sys


def main(argv: list[str]) -> None:
    target, args = argv
    module, name = target.split(":")
    getattr(importlib.import_module(module), name)(*json.loads(args))


if __name__ == "__main__":
    main(sys.argv[1:])

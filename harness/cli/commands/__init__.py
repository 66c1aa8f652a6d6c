"""Subcommands beyond the builder's, one module per command, found at parser-build time.

A module here defines `register(sub, bench)`: `sub` is the top-level subparsers object and
`bench` the `llava-harness bench ...` one. Each parser sets `func=` to a function taking the
parsed args and returning an exit code. Modules import torch and friends inside their
functions, never at top level, so `llava-harness --help` stays fast.
Errors for the user raise a `harness.errors.HarnessError` subclass: the CLI prints its one line
and exits 2.
"""

from __future__ import annotations

import importlib
import pkgutil


def register_all(sub, bench) -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.register(sub, bench)

"""What a command shows on the terminal: its human lines, its machine-readable output, and the
third-party warnings around them.

The one convention of every command: human lines go to stdout, unless the command was asked
for machine output (`--json`, or `-o -`), in which case stdout carries only that (one JSON
document or the file that `-` stands for) and the human lines go to stderr, so
`llava-harness ... --json | jq` always parses.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import warnings

from .checkpoint.atomic import atomic_file

# Warnings attributed to any module but the harness's own (and its suites'): a deprecation the
# harness causes is attributed to its line by the library that raises it.
NOT_THE_HARNESS = r"(?!(harness|suites)(\.|$))"

_machine_stdout = None  # the real stdout while human lines are sent to stderr


@contextlib.contextmanager
def machine_output(wanted: bool):
    """While the block runs, `print` goes to stderr and `write_machine` to the real stdout."""
    global _machine_stdout
    if not wanted:
        yield
        return
    saved, _machine_stdout = _machine_stdout, sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _machine_stdout = saved


def write_machine(text: str) -> None:
    """Machine-readable output: the real stdout (under `machine_output`), else stdout."""
    out = _machine_stdout or sys.stdout
    out.write(text)
    out.flush()


def write_text(path, text: str) -> None:
    """A command's `-o FILE`: `-` is stdout (machine output), anything else an atomic write."""
    if str(path) == "-":
        write_machine(text)
        return

    with atomic_file(path, force=True) as tmp:
        tmp.write_text(text, encoding="utf-8")


def print_json(data) -> None:
    write_machine(json.dumps(data, indent=2, default=str) + "\n")


_LIBRARIES = ("transformers", "torch", "bitsandbytes", "peft", "accelerate", "huggingface_hub",
              "safetensors", "tokenizers", "PIL", "numpy")
# bitsandbytes on an AVX-512-bf16 CPU tries to fetch a kernel from the hub at import and logs
# a warning when it cannot; it then uses its own CPU kernels, which is what the harness wants.
_NOISE = ("Failed to load CPU gemm_4bit_forward from kernels-community",)


def _one_line(message, category, filename, lineno, line=None) -> str:
    """A warning as one line that says whose it is, without the source line."""
    parts = str(filename).replace("\\", "/").split("/")
    owner = next((p for p in parts if p in _LIBRARIES), None)
    text = " ".join(str(message).split())
    who = f"warning from {owner}" if owner else "warning"
    return f"llava-harness: {who}: {text}\n"


class _DropNoise:
    @staticmethod
    def filter(record) -> bool:
        return not str(record.msg).startswith(_NOISE)


@contextlib.contextmanager
def quiet_third_party():
    """While a command runs: the libraries' deprecation notices about their own internals
    (nothing a user of the harness can act on) are silenced, the harness's own are not, other warnings are one line each, transformers logs errors only
    (and, with quiet_transformers, shows no progress bars), and bitsandbytes' hub-kernel notice
    is dropped. Everything is
    as it was afterwards, so calling the CLI in-process (the suites do) leaves no trace."""
    names = {"TRANSFORMERS_VERBOSITY": "error"}  # read by transformers at its import
    saved_env = {name: os.environ.get(name) for name in names}
    saved_format = warnings.formatwarning
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    hf = sys.modules.get("transformers.utils.logging")
    hf_state = (hf.get_verbosity(), hf.is_progress_bar_enabled()) if hf is not None else None
    with warnings.catch_warnings():
        # The format, not the display: a caller recording warnings (pytest) still gets them.
        warnings.formatwarning = _one_line
        for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
            warnings.filterwarnings("ignore", category=category, module=NOT_THE_HARNESS)
        os.environ.update(names)
        if hf is not None:
            quiet_transformers()
        bnb.addFilter(_DropNoise)
        try:
            yield
        finally:
            bnb.removeFilter(_DropNoise)
            warnings.formatwarning = saved_format
            for name, value in saved_env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            _restore_transformers(hf_state)


def quiet_transformers() -> None:
    """transformers to errors only and no progress bars: what a command that loads models calls
    once transformers is imported (quiet_third_party puts it back as it was afterwards)."""
    from transformers.utils import logging as hf_logging  # heavy: transformers

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _restore_transformers(state) -> None:
    hf = sys.modules.get("transformers.utils.logging")
    if hf is None:
        return
    level, bars = state if state is not None else (logging.WARNING, True)
    hf.set_verbosity(level)
    (hf.enable_progress_bar if bars else hf.disable_progress_bar)()

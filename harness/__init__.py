"""llava-harness's Python API: the names the README and docs/ show, imported from `harness`.

    from harness import build_spec, build, check, extract, strip, merge_lora

These names are the promise; the modules behind them are the harness's own layout and may move
(docs/architecture.md maps them; docs/api.md says what each does). `suites/test_docs.py` holds
every import the README and docs/ show to this list.

Each name is imported on first use (PEP 562 `__getattr__`): pytest imports this package for the
plugin in every run, and most commands never touch torch or transformers, so `import harness`
must not load them.
"""

from __future__ import annotations

import importlib

# name -> the module that defines it, grouped by concern (lowest floor first).
_HOMES = {
    # errors: every refusal of bad input is one of these (one line, exit 2 on the CLI)
    "HarnessError": "harness.errors",
    # the builder: synthetic checkpoints, tiny and real-size
    "PRESET_NAMES": "harness.synth.presets",
    "build_spec": "harness.synth.presets",
    "build": "harness.synth.builder",
    "cached_build": "harness.synth.cache",
    # what a LLaVA checkpoint is: `llava-harness check`
    "check": "harness.llava.check",
    # the model and its loader, as LLaVA's own code has them
    "load_pretrained_model": "harness.ops.load",
    "process_images": "harness.model.images",
    # the operations
    "extract": "harness.ops.extract",
    "count_checkpoint": "harness.ops.counts",
    "strip": "harness.ops.strip",
    "convert": "harness.ops.convert",
    "merge_lora": "harness.ops.merge",
    "verify_release": "harness.release.verify",
    # results, reports and the gate
    "Results": "harness.report.results",
    "make_record": "harness.report.results",
    "save_records": "harness.report.results",
    "load_results": "harness.report.results",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'harness' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

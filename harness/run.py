"""`llava-harness run`: build the tiny default and check it end to end.

Until the full main job (suites + report) lands, this is what the README's first command runs:
build, verify layout and every tensor's bytes, load the language model strictly into
transformers' Llama/Mistral class and run it, load the tokenizer (fast and slow) and the CLIP
tower offline, and print what was checked.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

from .specs import BuildSpec


def _check(name: str, fn, rows: list) -> bool:
    start = time.perf_counter()
    try:
        detail = fn()
        ok = True
    except Exception as exc:  # noqa: BLE001 - every failure becomes one report row
        detail, ok = f"{type(exc).__name__}: {exc}".splitlines()[0], False
    rows.append([name, "ok" if ok else "FAILED", f"{time.perf_counter() - start:.2f}", detail])
    return ok


def _language_model(folder: Path) -> str:
    import torch

    from .backbone import load_language_model

    model = load_language_model(folder)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 17, 42, 7]])).logits
    if not torch.isfinite(logits).all():
        raise ValueError("non-finite logits")
    return f"{type(model).__name__}, {model.num_parameters():,} params, logits {list(logits.shape)}"


def _tokenizer(folder: Path) -> str:
    from transformers import AutoTokenizer

    text = "A photo of 3 cats on a café table."
    ids = [AutoTokenizer.from_pretrained(folder, use_fast=fast)(text).input_ids
           for fast in (True, False)]
    if ids[0] != ids[1]:
        raise ValueError(f"fast and slow tokenizers disagree: {ids[0]} vs {ids[1]}")
    return f"fast == slow, {len(ids[0])} ids"


def _vision_tower(folder: Path) -> str:
    import torch
    from transformers import CLIPVisionModel

    path = json.loads((folder / "config.json").read_text())["mm_vision_tower"]
    tower = CLIPVisionModel.from_pretrained(path)
    size = tower.config.image_size
    with torch.no_grad():
        out = tower(torch.zeros(1, 3, size, size), output_hidden_states=True)
    return f"{len(out.hidden_states)} hidden states of {list(out.hidden_states[-2].shape)}"


def run_tiny(spec: BuildSpec, keep: Path | None = None) -> int:
    from .checkpoint.atomic import check_target
    from .checkpoint.reader import open_folder
    from .synth import build
    from .verify import data_problems, layout_problems

    if keep:
        check_target(Path(keep), force=False)  # refuse before any work; never replace it

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="llava-harness-run-"))
    folder = Path(keep) if keep else work / spec.model.name
    rows: list = []

    def problems(fn):
        found = fn(spec, open_folder(folder))
        if found:
            raise ValueError(f"{len(found)} problem(s), first: {found[0]}")
        return "none"

    try:
        ok = _check("build", lambda: f"{len(build(spec, folder).tensors)} "
                                     f"tensors at {folder}", rows)
        if ok:
            _check("index and files consistent, layout as planned",
                   lambda: problems(layout_problems), rows)
            _check("every tensor's bytes regenerate from (seed, key)",
                   lambda: problems(data_problems), rows)
            _check("language model loads strictly and runs", lambda: _language_model(folder),
                   rows)
            if spec.with_tokenizer:
                _check("tokenizer loads offline", lambda: _tokenizer(folder), rows)
            if spec.with_vision_tower:
                _check("CLIP tower loads offline and runs", lambda: _vision_tower(folder), rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(tabulate(rows, headers=["check", "result", "seconds", "detail"], tablefmt="github"))
    failed = sum(r[1] != "ok" for r in rows)
    print(f"\n{len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0

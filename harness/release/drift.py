"""The quantize relation's second look: the quantized folder and its source run on the
harness's probe (harness.model.probe), and their logits compared.

The packed weights dequantized against the float ones are the proof; this shows what the
difference does to the model's output. It runs only where it is cheap and needs nothing from
outside: both folders together under PROBE_LIMIT bytes, both with the tokenizer LLaVA's loader
needs, and the vision tower a local folder (the harness never downloads). Both load on CPU in float32, each in its own scope so that one
model is held at a time. The bound is relative to the float model's largest |logit|
(`[release.quantize.logits.<scheme>]`), so it reads the same for any small model, and
top-1 agreement has its own floor.
"""

from __future__ import annotations

from ..errors import HarnessError
from ..llava.kinds import TOKENIZER_FILES
from ..ops.quant import cpu_4bit_problem
from ..tolerances import tolerance
from .artifacts import Artifact

# Both folders together: a few tiny checkpoints (the harness's tiny ones are 1-10 MiB), never a
# real model, whose float32 load alone would be tens of GiB on a CPU runner.
PROBE_LIMIT = 256 * 2**20


def skipped_because(found: Artifact, source: Artifact, scheme: str,
                    shapes: list[tuple[int, int]]) -> str | None:
    """Why the probe cannot run here, or None. `shapes`: the quantized layers' weights."""
    total = found.bytes() + source.bytes()
    if total > PROBE_LIMIT:
        return (f"{total / 2**20:,.0f} MiB together; the probe runs under "
                f"{PROBE_LIMIT / 2**20:.0f} MiB")
    for artifact in (source, found):
        if not any((artifact.path / n).is_file() for n in TOKENIZER_FILES):
            return (f"{artifact.name} has no tokenizer ({' or '.join(TOKENIZER_FILES)}), "
                    "which LLaVA's loader needs; `llava-harness check` says so too")
    for artifact in (source, found):
        if artifact.tower_path is None:
            return (f"{artifact.name}'s mm_vision_tower "
                    f"{artifact.config.get('mm_vision_tower')!r} is not a local folder (the "
                    "harness never downloads one)")
    if scheme != "int8":
        return cpu_4bit_problem(shapes)  # bitsandbytes runs on CPU here
    return None


def probe(artifact: Artifact, tower):
    """The probe's float32 logits from `artifact` loaded on CPU (a pre-quantized folder loads
    through its quantization_config, as transformers does)."""
    import torch  # heavy: torch

    from ..model.probe import probe_logits  # heavy: torch
    from ..ops.load import load  # heavy: torch, transformers

    loaded = load(artifact.path, None, "llava-release", device="cpu", dtype=torch.float32,
                  detect="files", vision_tower=tower, vision_tower_dtype=torch.float32)
    try:
        return probe_logits(loaded.model, loaded.image_processor).float()
    finally:
        del loaded


def logit_drift(out, found: Artifact, source: Artifact, scheme: str,
                shapes: list[tuple[int, int]]) -> None:
    """Add the probe's drift to the quantize relation's outcome `out`: figures, and a fault
    when it is past the scheme's bound. `shapes`: the quantized layers' weights."""
    why = skipped_because(found, source, scheme, shapes)
    if why is not None:
        out.notes.append(f"logit probe skipped: {why}")
        return
    try:
        want = probe(source, source.tower_path)
        got = probe(found, found.tower_path)  # its own: a tower swapped in shows here
    except HarnessError as exc:  # a folder the loader refuses: said, with the loader's reason
        out.fault(f"logit probe: {exc}")
        return
    bound = tolerance(f"release.quantize.logits.{scheme}")
    scale = max(float(want.abs().max()), 1e-30)
    drift = float((got - want).abs().max()) / scale
    top1 = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    out.figures |= {"logit_drift": drift, "top1_agreement": top1}
    out.notes.append(f"logit probe: max |difference| {drift:.3g} of the largest |logit| "
                     f"({scale:.3g}), top-1 agreement {top1:.2f} over {want.shape[1]} positions")
    if not drift <= bound.rtol:
        out.fault(f"logit probe: {found.name} drifts {drift:.3g} of the largest |logit| from "
                  f"{source.name} (bound {bound.rtol:g}): more than {scheme} rounding explains")
    if not top1 >= bound.top1:
        out.fault(f"logit probe: top-1 agreement {top1:.2f} with {source.name} "
                  f"(bound {bound.top1:g})")

"""Each relation of a release proved tensor by tensor: what differs, where, and by how much.

- merge: the merged artifact against base + adapter recomputed with peft's arithmetic
  (harness.ops.merge's MergedView, nothing written): bit for bit, or within the bound of
  `[release.merge.<dtype>]`; the adapter must change something, its trainables must be in, and
  a difference says what it looks like (the update applied twice, alpha instead of alpha/r,
  another base).
- convert / strip / extract: copies under a key map, so bit for bit (a vocabulary padded by the
  converter, a dtype cast by a tool, are said, not failed); configs compared by meaning.
- quantize: every packed weight dequantized by bitsandbytes against the float weight, within
  the scheme's bound (`[release.quantize.<scheme>]`); what stays float, bit for bit; and, for
  folders small enough to run here, the logits' drift on the probe (harness.release.drift).
- stage1: the projector a stage-2 run started from: its distance, never a verdict.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..checkpoint.identity import meaning
from ..checkpoint.quantized import quantized_linears, scheme_of, stored_keys
from ..checkpoint.reader import as_tensor
from ..checkpoint.tensors import prefetch
from ..llava.config import lm_fields, rope_4x
from ..llava.keys import (PROJECTOR_PREFIX, VISION_TOWER_PREFIX, is_language_model_key,
                          is_legacy_buffer)
from ..ops.quant import dequantized
from ..tolerances import apart, tolerance, ulp_at_scale
from .artifacts import Artifact
from .drift import logit_drift
from .manifest import Relation

# How a difference reads when it is one of the known faults: the found update over the
# expected one (least squares), near these values.
_RATIO_TOLERANCE = 0.02
_SHOWN = 5  # faults listed per relation before "and N more"
# Tensors announced to the kernel ahead of the one being computed: about one decoder layer,
# so its arithmetic runs while the next layer is read.
PREFETCH_AHEAD = 9


@dataclass
class Outcome:
    """One relation's verdict: faults fail it, notes say what was seen."""

    relation: Relation
    faults: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.faults

    def fault(self, text: str) -> None:
        self.faults.append(text)

    def count(self, name: str, n: float = 1) -> None:
        self.figures[name] = self.figures.get(name, 0) + n


def _dtype_name(t) -> str:
    return str(t.dtype).removeprefix("torch.")


def _equal(a, b) -> bool:
    import torch  # heavy: torch

    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    # Compared as integers of the element's width: bit for bit (NaN equal to the same NaN, -0
    # not +0), and 2.4x faster than as bytes.
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(-1).view(as_int), b.contiguous().view(-1).view(as_int))


# --- merge --------------------------------------------------------------------------------------

def _update_ratio(found, expected, base) -> float | None:
    """How many times peft's update the found tensor carries: <found - base, expected - base>
    over |expected - base|^2 (None when the adapter does not touch this tensor)."""
    want = expected.double() - base.double()
    norm = float((want * want).sum())
    if norm == 0:
        return None
    return float(((found.double() - base.double()) * want).sum()) / norm


def _ratio_hint(ratio: float, r: int) -> str:
    for value, hint in ((0.0, "the update is missing: merged into nothing, or not merged"),
                        (2.0, "the update is applied twice: merged twice?"),
                        (float(r), f"the update is r={r} times peft's: scaled by alpha "
                                   "instead of alpha/r?")):
        if abs(ratio - value) <= _RATIO_TOLERANCE * max(1.0, abs(value)):
            return hint
    return "not the base plus a multiple of the update: merged into another base?"


def verify_merge(rel: Relation, found: Artifact, base: Artifact, adapter: Artifact) -> Outcome:
    from ..ops.adapter import AdapterConfig  # heavy: torch
    from ..ops.merge import merged_view  # heavy: torch

    out = Outcome(rel)
    dtype = _dtype_name(found.tensor("model.embed_tokens.weight"))
    bound = tolerance(f"release.merge.{dtype}")
    rank = AdapterConfig.read(adapter.path).r
    with merged_view(adapter.path, base.path, dtype) as view, _Reader() as reader:
        expected_keys = [k for k in view.keys if not is_legacy_buffer(k)]
        for i, key in enumerate(expected_keys):
            reader.ahead([s[k] for k in expected_keys[i:i + PREFETCH_AHEAD]
                          for s in (view.folder.tensors, found.sources) if k in s])
            if key not in found.sources:
                out.fault(f"{key}: missing from {found.name}")
                continue
            _merge_tensor(out, key, view, found, bound, rank)
        _extra(out, found, base, set(view.keys))
        if not out.figures.get("changed_by_adapter"):
            out.fault(f"{adapter.name}: its update changes no tensor of {base.name}: the "
                      "adapter is empty or zero")
        out.figures["trainables"] = len(view.plan.trainables)
    return out


class _Reader:
    """A thread that reads the next tensors while this one is computed: each source is read
    once, in order, into one buffer (the pages stay cached for the real read)."""

    def __enter__(self):
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="release-read")
        self.buffer = bytearray(16 << 20)
        self.seen: set[int] = set()
        return self

    def ahead(self, sources) -> None:
        for source in sources:
            if id(source) not in self.seen:
                self.seen.add(id(source))
                self.pool.submit(prefetch, source, self.buffer)

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _merge_tensor(out: Outcome, key: str, view, found: Artifact, bound, rank: int) -> None:
    expected, got = view.merged(key), found.tensor(key)
    out.count("tensors")
    base = view.base(key)
    if base is not None and key in view.plan.modules and not _equal(expected, base):
        out.count("changed_by_adapter")
    if _equal(expected.to(got.dtype), got):
        out.count("identical")
        return
    if expected.shape != got.shape:
        out.fault(f"{key}: {found.name} stores {list(got.shape)}, base + adapter give "
                  f"{list(expected.shape)}")
        return
    gap = apart(got, expected.to(got.dtype))
    ulps = gap.max_abs / float(ulp_at_scale(expected, got.dtype))
    out.figures["max_ulps"] = max(out.figures.get("max_ulps", 0.0), ulps)
    if ulps <= bound.ulps:
        out.count("within_bound")
        return
    why = ""
    if key in view.plan.trainables:
        why = f"; {found.name} holds the base's projector, not non_lora_trainables'" if (
            base is not None and _equal(base.to(got.dtype), got)) else ""
    elif base is not None and key in view.plan.modules:
        ratio = _update_ratio(got, expected, base)
        if ratio is not None:
            why = f"; it carries {ratio:.3g}x peft's update: {_ratio_hint(ratio, rank)}"
    out.fault(f"{key}: {gap} ({ulps:.3g} ulps at scale, bound {bound.ulps:g}){why}")


def _extra(out: Outcome, found: Artifact, source: Artifact, expected: set[str]) -> None:
    """Tensors `found` holds beyond `expected`: a vision tower saved with the model (LLaVA's
    save_pretrained does) must be the tower `mm_vision_tower` names; anything else is a fault."""
    extra = sorted(k for k in found.sources if k not in expected and not is_legacy_buffer(k))
    tower = [k for k in extra if k.startswith(VISION_TOWER_PREFIX)]
    named = source.tower
    for key in tower:
        if key in named:
            _copied(out, key, found.tensor(key), as_tensor(named[key], {}),
                    f"the tower {source.name}'s mm_vision_tower names")
        else:
            out.fault(f"{key}: a tower tensor in {found.name} that the tower "
                      f"{source.name}'s mm_vision_tower names does not hold")
    if tower and not named:
        out.notes.append(f"{found.name} also stores the vision tower ({len(tower)} tensors); "
                         "the tower mm_vision_tower names is not a local folder to compare")
    for key in [k for k in extra if k not in tower][:_SHOWN]:
        out.fault(f"{key}: in {found.name}, not in {source.name}")


# --- copies under a key map: convert, strip, extract --------------------------------------------

def _copied(out: Outcome, name: str, got, want, what: str, candidates: dict | None = None
            ) -> None:
    """A tensor that must be a copy: bit for bit (a dtype cast by the tool is noted, and then
    the cast must be exact). On a difference, `candidates` (name -> source) are searched for
    the tensor it holds instead: a key mapped to the wrong name."""
    out.count("tensors")
    if _equal(got, want):
        out.count("identical")
        return
    if got.dtype != want.dtype and got.shape == want.shape and _equal(got, want.to(got.dtype)):
        out.count("identical")
        if "cast" not in out.figures:
            out.notes.append(f"{name}: stored as {_dtype_name(got)}, equal to the "
                             f"{_dtype_name(want)} source cast to it: the tool changed the dtype")
        out.figures["cast"] = out.figures.get("cast", 0) + 1
        return
    instead = _holds(got, candidates) if len(out.faults) < _SHOWN and candidates else None
    if instead:
        out.fault(f"{name}: holds {instead}, not {what}: a key mapped to the wrong name")
    elif got.shape != want.shape:
        out.fault(f"{name}: {list(got.shape)}, {what} has {list(want.shape)}")
    else:
        out.fault(f"{name}: not a copy of {what}: {apart(got, want.to(got.dtype))}")


def _holds(got, candidates: dict) -> str | None:
    """The candidate whose tensor `got` is, bit for bit."""
    for key, source in candidates.items():
        if tuple(source.shape) == tuple(got.shape) and _equal(as_tensor(source, {}).to(got.dtype),
                                                               got):
            return key
    return None


def _same_config(out: Outcome, ours: dict, theirs: dict, label: str) -> None:
    """Fields both configs state must mean the same."""
    ours, theirs = meaning(rope_4x(ours)), meaning(rope_4x(theirs))
    for key in sorted(set(ours) & set(theirs)):
        if key in ("model_type", "architectures", "torch_dtype", "dtype", "vocab_size"):
            continue
        if ours[key] == theirs[key]:
            continue
        if key == "mm_vision_tower":
            # A local copy or the hub id says where the tower is, not what it holds: said, and
            # the quantize relation's logit probe runs each folder with its own tower.
            out.notes.append(f"config {label}.{key}: {theirs[key]!r}, the source says "
                             f"{ours[key]!r}")
        else:
            out.fault(f"config {label}.{key}: {theirs[key]!r}, the source says {ours[key]!r}")


def verify_convert(rel: Relation, found: Artifact, source: Artifact) -> Outcome:
    """An llava-hf folder against the original it was converted from (or the reverse)."""
    out = Outcome(rel)
    want = {**source.sources, **source.tower}
    have = {**found.sources, **found.tower}
    rows = lm_fields(source.config).get("vocab_size")
    for key, stored in sorted(have.items()):
        got, label = as_tensor(stored, {}), f"{found.name}:{stored.key}"
        if key not in want:
            out.fault(f"{label}: has no tensor {key} in {source.name}")
            continue
        expected = as_tensor(want[key], {})
        if key in ("model.embed_tokens.weight", "lm_head.weight") and \
                got.shape[0] != expected.shape[0]:
            extra = abs(got.shape[0] - expected.shape[0])
            out.notes.append(f"{key}: {extra} row(s) of image and pad tokens, added or taken "
                             "away by the conversion")
            got, expected = got[:expected.shape[0]], expected[:got.shape[0]]
        _copied(out, label, got, expected, f"{source.name}'s {key}", want)
    for key in sorted(set(want) - set(have)):
        if not is_legacy_buffer(key):
            out.fault(f"{key}: in {source.name}, missing from {found.name}")
    for key in found.unmapped[:_SHOWN]:
        out.fault(f"{found.name}:{key}: a tensor no layout rule places")
    _same_config(out, lm_fields(source.config), lm_fields(found.config), "text")
    out.figures["vocab_rows"] = rows or 0
    return out


def verify_strip(rel: Relation, found: Artifact, source: Artifact) -> Outcome:
    """A plain language model against the LLaVA it was stripped from: its tensors bit for bit
    and nothing else kept."""
    out = Outcome(rel)
    for key in sorted(found.sources):
        if not is_language_model_key(key) and not is_legacy_buffer(key):
            out.fault(f"{found.name}: keeps {key}, which a plain language model does not hold")
        elif key in source.sources:
            _copied(out, key, found.tensor(key), source.tensor(key), f"{source.name}'s {key}")
        else:
            out.fault(f"{key}: in {found.name}, not in {source.name}")
    for key in sorted(source.sources):
        if is_language_model_key(key) and key not in found.sources:
            out.fault(f"{key}: dropped from {found.name}")
    _same_config(out, lm_fields(source.config), found.config, "plain")
    return out


def verify_extract(rel: Relation, found: Artifact, source: Artifact) -> Outcome:
    out = Outcome(rel)
    projector = {k for k in source.sources if k.startswith(PROJECTOR_PREFIX)}
    for key in sorted(set(found.sources) | projector):
        if key not in found.sources:
            out.fault(f"{key}: in {source.name}, missing from {found.name}")
        elif key not in projector:
            out.fault(f"{found.name}: holds {key}, which is not {source.name}'s projector")
        else:
            _copied(out, key, found.tensor(key), source.tensor(key), f"{source.name}'s {key}")
    return out


def verify_stage1(rel: Relation, found: Artifact, source: Artifact) -> Outcome:
    """The stage-1 projector a stage-2 run started from: a distance, never a fault (stage 2
    trains the projector on)."""
    out = Outcome(rel)
    for key in sorted(found.sources):
        if key not in source.sources:
            out.notes.append(f"{key}: in {found.name}, not in {source.name}")
            continue
        got, want = found.tensor(key).double(), source.tensor(key).double()
        if got.shape != want.shape:
            out.fault(f"{key}: {list(got.shape)} in {found.name}, {list(want.shape)} in "
                      f"{source.name}: not the same projector")
            continue
        rel_change = float((want - got).norm() / got.norm().clamp(min=1e-30))
        out.notes.append(f"{key}: stage 2 moved it by {rel_change:.3g} of its norm "
                         f"({apart(want, got)})")
        out.figures["max_relative_change"] = max(out.figures.get("max_relative_change", 0.0),
                                                 rel_change)
    return out


# --- quantize -----------------------------------------------------------------------------------

def verify_quantize(rel: Relation, found: Artifact, source: Artifact) -> Outcome:
    out = Outcome(rel)
    scheme = scheme_of(found.config, found.path / "config.json")
    want_name = f"bnb-{rel.arg}"
    if scheme is None or scheme.name != want_name:
        out.fault(f"{found.name}: config.json's quantization_config is "
                  f"{scheme.name if scheme else 'absent'}, the manifest says {rel.arg}")
        return out
    bound = tolerance(f"release.quantize.{rel.arg}")
    stored = found.folder.tensors
    linears = quantized_linears(scheme, stored, found.path)
    for module, linear in sorted(linears.items()):
        key = f"{module}.weight"
        if key not in source.sources:
            out.fault(f"{key}: quantized in {found.name}, not in {source.name}")
            continue
        want = source.tensor(key).float()
        gap = apart(dequantized(linear, scheme), want)
        limit = bound.rtol * float(want.abs().max())
        out.count("quantized")
        out.figures["max_relative_error"] = max(out.figures.get("max_relative_error", 0.0),
                                                gap.max_abs / max(float(want.abs().max()),
                                                                  1e-30))
        if gap.max_abs > limit:
            out.fault(f"{key}: dequantized {gap} (bound {bound.rtol:g} of its largest "
                      f"|value|, {limit:.3g}): not a {rel.arg} quantization of "
                      f"{source.name}'s weight")
    _same_config(out, source.config, found.config, "quantized")
    quantized = stored_keys(linears)
    for key, source_key in sorted(found.stored_names.items()):
        if source_key in quantized:
            continue
        if key in source.sources:
            _copied(out, key, found.tensor(key), source.tensor(key), f"{source.name}'s {key}")
    _extra(out, found, source, {k for k in found.sources
                                if k in source.sources or found.stored_names[k] in quantized})
    missing = sorted(k for k in source.sources
                     if k not in found.sources and not is_legacy_buffer(k))
    for key in missing[:_SHOWN]:
        out.fault(f"{key}: in {source.name}, missing from {found.name}")
    if out.ok:  # the weights are right: what do they do to the output?
        logit_drift(out, found, source, rel.arg,
                    [tuple(source.sources[f"{m}.weight"].shape) for m in linears])
    return out


VERIFIERS = {"merge": verify_merge, "convert": verify_convert, "strip": verify_strip,
             "extract": verify_extract, "stage1": verify_stage1, "quantize": verify_quantize}


def verify(rel: Relation, artifacts: dict[str, Artifact]) -> Outcome:
    start = time.perf_counter()
    outcome = VERIFIERS[rel.op](rel, artifacts[rel.target],
                                *(artifacts[s] for s in rel.sources))
    outcome.figures["wall_s"] = time.perf_counter() - start
    outcome.figures["bytes"] = sum(artifacts[n].bytes() for n in (rel.target, *rel.sources))
    return outcome

"""LLaVA's naive ways, load everything then keep what is wanted: the baselines that the
extract, strip and merge benchmarks measure the harness against.

Each function is a child's whole work, started by launcher.launch in a fresh process, and
does what a hand-written script does (scripts/extract_mm_projector.py, a load/filter/save
strip, peft's merge_and_unload): whole shards through `torch.load` (weights-only) or
safetensors' `load_file`, nothing streamed. They are the yardstick, so they must stay exactly
this slow and this large: no harness readers or writers here, only torch, safetensors and the
file names (the merge's baseline, which needs the harness's LLaVA classes, is naive_merge.py).
torch is imported inside each function, so the parent (which imports this module to name the
child) stays light; a child's work time starts after `import torch`.
"""

from __future__ import annotations

import json
import os
import time

# Format: (index file, single-file checkpoint).
_NAMES = {"bin": ("pytorch_model.bin.index.json", "pytorch_model.bin"),
          "safetensors": ("model.safetensors.index.json", "model.safetensors")}
# What a strip drops: LLaVA's multimodal modules, by substring of the key.
_MULTIMODAL = ("mm_projector", "vision_tower", "vision_resampler", "image_newline")


def _load_whole(path: str, fmt: str) -> dict:
    import torch  # heavy: torch; the child's, never the parent's

    if fmt == "bin":
        return torch.load(path, map_location="cpu", weights_only=True)
    from safetensors.torch import load_file  # heavy: safetensors.torch

    return load_file(path)


def _weight_map(folder: str, fmt: str) -> dict | None:
    """The index's weight_map, or None for a single-file checkpoint."""
    index = os.path.join(folder, _NAMES[fmt][0])
    if not os.path.exists(index):
        return None
    with open(index) as f:
        return json.load(f)["weight_map"]


def write_stats(stats: str, start: float) -> None:
    with open(stats, "w") as f:
        json.dump({"work_s": time.perf_counter() - start}, f)


def whole_shard_extract(folder: str, fmt: str, patterns: list[str], out: str, stats: str) -> None:
    """The keys matching any of `patterns`, from every shard that holds one (each loaded
    whole), `torch.save`d to `out`; the work time to `stats`."""
    import torch  # heavy: torch; the child's, never the parent's

    start = time.perf_counter()
    weight_map = _weight_map(folder, fmt)
    if weight_map is None:
        files = {_NAMES[fmt][1]: None}
    else:
        files = {}
        for key, file in weight_map.items():
            if any(p in key for p in patterns):
                files.setdefault(file, []).append(key)
    picked = {}
    for file, keys in files.items():
        state = _load_whole(os.path.join(folder, file), fmt)
        keys = keys or [k for k in state if any(p in k for p in patterns)]
        picked.update({k: state[k] for k in keys})
        del state
    torch.save(picked, out)
    write_stats(stats, start)


def whole_shard_strip(src: str, out: str, keep: bool) -> None:
    """Shard by shard: load it whole, drop the multimodal keys (and the legacy rotary buffers
    unless `keep`), save the rest under the same name and fsync it; then the index and a
    llama config."""
    fmt = "safetensors" if any(f.endswith(".safetensors") for f in os.listdir(src)) else "bin"
    index_name, single = _NAMES[fmt]
    source_map = _weight_map(src, fmt)
    files = [single] if source_map is None else sorted(set(source_map.values()))
    os.makedirs(out)
    weight_map, total = {}, 0
    for file in files:
        state = _load_whole(os.path.join(src, file), fmt)
        kept = {k: v for k, v in state.items() if not any(d in k for d in _MULTIMODAL)
                and (keep or not k.endswith("rotary_emb.inv_freq"))}
        del state
        target = os.path.join(out, file)
        _save_whole(kept, target, fmt)
        weight_map.update({k: file for k in kept})
        total += sum(v.numel() * v.element_size() for v in kept.values())
        del kept
    if source_map is not None:
        with open(os.path.join(out, index_name), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f,
                      indent=2, sort_keys=True)
    _write_llama_config(src, out)


def _save_whole(state: dict, target: str, fmt: str) -> None:
    """`state` saved in one go and fsynced, so the step ends with its bytes on disk."""
    import torch  # heavy: torch; the child's, never the parent's

    if fmt == "bin":
        torch.save(state, target)
    else:
        from safetensors.torch import save_file  # heavy: safetensors.torch

        save_file(state, target, metadata={"format": "pt"})
    fd = os.open(target, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def _write_llama_config(src: str, out: str) -> None:
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config = {k: v for k, v in config.items() if "mm_" not in k and "vision" not in k
              and not k.startswith("image_")}
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)

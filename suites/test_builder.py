"""The builder writes folders that load like published LLaVA checkpoints, deterministically,
atomically, and consistently with their index for every sharding and placement."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.checkpoint.atomic import OutputExistsError
from harness.checkpoint.reader import consistency_problems, open_folder
from harness.synth import builder as synth
from harness.synth.builder import build
from harness.synth.content import make_tensor
from harness.synth.plan import make_plan
from harness.synth.presets import build_spec
from harness.synth.verify import verify


def bare(spec):
    """The same spec without tokenizer and tower: only tensors, configs and index."""
    return dataclasses.replace(spec, with_tokenizer=False, with_vision_tower=False)


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    ckpt = open_folder(folder)
    return ckpt.read(sorted(ckpt.tensors))


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_tiny_folder_has_the_published_file_set(tiny_checkpoint):
    names = {p.name for p in tiny_checkpoint.iterdir()}
    assert {"config.json", "generation_config.json", "pytorch_model.bin.index.json",
            "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
            "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
            "vision_tower"} <= names
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["architectures"] == ["LlavaLlamaForCausalLM"]
    assert config["model_type"] == "llava"
    assert Path(config["mm_vision_tower"]) == (tiny_checkpoint / "vision_tower").resolve()
    for field, value in [("mm_vision_select_layer", -2), ("mm_vision_select_feature", "patch"),
                         ("image_aspect_ratio", "pad"), ("mm_use_im_start_end", False),
                         ("mm_use_im_patch_token", False), ("mm_projector_type", "mlp2x_gelu"),
                         ("mm_hidden_size", 32)]:
        assert config[field] == value, field
    assert verify(build_spec("tiny"), tiny_checkpoint) == []


def test_tiny_language_model_loads_into_llama_after_filtering(tiny_checkpoint):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = json.loads((tiny_checkpoint / "config.json").read_text())
    llama = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items()
                                            if not k.startswith(("mm_", "_"))
                                            and k not in ("model_type", "architectures")}))
    state = {k: v for k, v in all_tensors(tiny_checkpoint).items()
             if "mm_projector" not in k and not k.endswith("inv_freq")}
    result = llama.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    logits = llama(torch.tensor([[1, 5, 9, 42]])).logits
    assert logits.shape == (1, 4, config["vocab_size"]) and torch.isfinite(logits).all()
    # Distinct positions give distinct predictions: the weights are not degenerate.
    assert not torch.allclose(logits[0, 0], logits[0, 1])


def test_tiny_tokenizer_and_tower_load_offline(tiny_checkpoint):
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel

    config = json.loads((tiny_checkpoint / "config.json").read_text())
    for fast in (True, False):
        tok = AutoTokenizer.from_pretrained(tiny_checkpoint, use_fast=fast)
        assert len(tok) == config["vocab_size"]
    tower = CLIPVisionModel.from_pretrained(config["mm_vision_tower"])
    processor = CLIPImageProcessor.from_pretrained(config["mm_vision_tower"])
    assert tower.config.hidden_size == config["mm_hidden_size"]
    assert processor.crop_size["height"] == tower.config.image_size


def test_same_tensor_same_bytes_across_formats_shardings_and_placements(tmp_path):
    base = bare(build_spec("tiny"))
    variants = [
        base.checkpoint.replace(format="bin", shards=1),
        base.checkpoint.replace(format="safetensors", shards=3, placement="split"),
        base.checkpoint.replace(format="bin", shards=4, placement="middle"),
        base.checkpoint.replace(format="safetensors", max_shard_size=100_000, placement="first"),
    ]
    loaded = []
    for i, ck in enumerate(variants):
        build(dataclasses.replace(base, checkpoint=ck), tmp_path / str(i))
        loaded.append(all_tensors(tmp_path / str(i)))
    reference = loaded[0]
    for other in loaded[1:]:
        assert other.keys() == reference.keys()
        for key, tensor in reference.items():
            assert tensor.dtype == other[key].dtype
            assert torch.equal(tensor.view(torch.uint8), other[key].view(torch.uint8)), key


def test_values_are_varied_and_regenerable(tmp_path):
    spec = bare(build_spec("tiny"))
    build(spec, tmp_path / "c")
    tensors = all_tensors(tmp_path / "c")
    for info in make_plan(spec).tensors:
        t = tensors[info.key]
        # Regenerable from (seed, key) alone, without the rest of the checkpoint.
        assert torch.equal(t, make_tensor(spec.checkpoint.seed, info, spec.model))
        assert t.float().std() > 0, f"{info.key} is constant"
        if t.dim() == 2:
            assert torch.unique(t, dim=0).shape[0] == t.shape[0], f"{info.key} repeats a row"
    weights = [t for k, t in tensors.items() if k.endswith("q_proj.weight")]
    assert not torch.equal(weights[0], weights[1]), "two layers got the same tensor"


def test_seed_changes_every_tensor(tmp_path):
    spec = bare(build_spec("tiny"))
    build(spec, tmp_path / "a")
    build(dataclasses.replace(spec, checkpoint=spec.checkpoint.replace(seed=1)), tmp_path / "b")
    a, b = all_tensors(tmp_path / "a"), all_tensors(tmp_path / "b")
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert set(changed) == {k for k in a if not k.endswith("inv_freq")}


def test_build_is_reproducible_to_the_byte(tmp_path):
    spec = bare(build_spec("tiny", checkpoint={"format": "safetensors"}))
    build(spec, tmp_path / "a")
    build(spec, tmp_path / "b")
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")


def test_bin_shards_are_what_torch_save_writes(tmp_path):
    """Same records in the same order with the same bytes as torch.save of the same dict."""
    import zipfile

    spec = bare(build_spec("tiny", checkpoint={"shards": 1}))
    build(spec, tmp_path / "c")
    ours = tmp_path / "c" / "pytorch_model.bin"
    theirs = tmp_path / "pytorch_model.bin"
    tensors = torch.load(ours, weights_only=True)
    torch.save(tensors, theirs)
    with zipfile.ZipFile(ours) as a, zipfile.ZipFile(theirs) as b:
        assert a.testzip() is None  # every CRC valid
        assert [i.filename for i in a.infolist()] == [i.filename for i in b.infolist()]
        for info in a.infolist():
            if not info.filename.endswith("serialization_id"):
                assert a.read(info) == b.read(info), info.filename


def test_safetensors_shards_are_what_safetensors_writes(tmp_path):
    from safetensors.torch import load_file, save_file

    spec = bare(build_spec("tiny", checkpoint={"format": "safetensors", "shards": 1}))
    build(spec, tmp_path / "c")
    ours = tmp_path / "c" / "model.safetensors"
    save_file(load_file(ours), tmp_path / "theirs.safetensors", metadata={"format": "pt"})
    assert ours.read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()


# --- atomicity ------------------------------------------------------------------------------

def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_existing_output_is_refused_and_untouched(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "mine.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="--force"):
        build(bare(build_spec("tiny")), target)
    assert [p.name for p in target.iterdir()] == ["mine.txt"]


def test_force_replaces_an_existing_output(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    build(bare(build_spec("tiny")), target, force=True)
    assert not (target / "stale.txt").exists() and (target / "config.json").exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt])
def test_failure_midway_leaves_nothing(tmp_path, monkeypatch, failure):
    calls = {"n": 0}
    real = synth.tensor_chunks

    def failing(seed, info, model, *args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise failure
        return real(seed, info, model, *args)

    monkeypatch.setattr(synth, "tensor_chunks", failing)
    with pytest.raises(type(failure) if isinstance(failure, Exception) else failure):
        build(bare(build_spec("tiny")), tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_interrupt_between_the_swap_renames_restores_the_old_output(tmp_path, monkeypatch):
    target = tmp_path / "out"
    build(bare(build_spec("tiny")), target)
    before = tree_digest(target)
    real_rename = Path.rename

    def rename(self, dest):
        if Path(dest) == target.absolute() and self.name.endswith(".partial"):
            raise KeyboardInterrupt  # after the old output was moved aside
        return real_rename(self, dest)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        build(bare(build_spec("tiny", checkpoint={"seed": 3})), target, force=True)
    monkeypatch.undo()
    assert tree_digest(target) == before and leftovers(tmp_path) == []


def test_output_appearing_during_the_build_is_not_replaced(tmp_path, monkeypatch):
    target = tmp_path / "out"
    real = synth.write_configs

    def racing(spec, folder, tower):
        real(spec, folder, tower)
        target.mkdir()
        (target / "someone-elses.txt").write_text("x")

    monkeypatch.setattr(synth, "write_configs", racing)
    with pytest.raises(OutputExistsError):
        build(bare(build_spec("tiny")), target)
    assert [p.name for p in target.iterdir()] == ["someone-elses.txt"]
    assert leftovers(tmp_path) == []


def test_failure_under_force_keeps_the_old_output(tmp_path, monkeypatch):
    target = tmp_path / "out"
    build(bare(build_spec("tiny")), target)
    before = tree_digest(target)
    monkeypatch.setattr(synth, "write_configs", lambda *a: (_ for _ in ()).throw(OSError("x")))
    with pytest.raises(OSError):
        build(bare(build_spec("tiny", checkpoint={"seed": 3})), target, force=True)
    assert tree_digest(target) == before and leftovers(tmp_path) == []


# --- every sharding and placement gives a consistent folder ---------------------------------

@settings(max_examples=10)
@given(shards=st.integers(1, 6), placement=st.sampled_from(["last", "first", "middle", "split"]),
       fmt=st.sampled_from(["bin", "safetensors"]), legacy=st.booleans())
def test_built_folder_matches_its_plan(tmp_path_factory, shards, placement, fmt, legacy):
    if (placement == "middle" and shards < 3) or (placement == "split" and shards < 2):
        return
    spec = bare(build_spec("tiny", checkpoint={"shards": shards, "placement": placement,
                                               "format": fmt, "legacy_buffers": legacy}))
    folder = tmp_path_factory.mktemp("prop") / "c"
    plan = build(spec, folder)
    ckpt = open_folder(folder)
    assert consistency_problems(ckpt) == []
    # Union of the shards' tensors is exactly the plan, each where the index says.
    assert {k: m.file for k, m in ckpt.tensors.items()} == \
        {t.key: s.name for s in plan.shards for t in s.tensors}
    assert ckpt.total_size == (None if shards == 1 else
                               sum(m.nbytes for m in ckpt.tensors.values()))
    assert verify(spec, folder) == []


LOCKED_BUILD = '''
import sys, time
import harness.synth.builder as builder
from harness.synth.cache import cached_build
from harness.synth.presets import build_spec

root, log, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
real = builder.build

def counted(*args, **kwargs):
    with open(log, "a") as fh:
        fh.write("built\\n")
    time.sleep(1.0)  # widen the window a second process would race into
    return real(*args, **kwargs)

builder.build = counted
time.sleep(max(0.0, start - time.time()))
spec = build_spec("tiny", checkpoint={"shards": 1})
print(cached_build(spec, root))
'''


def test_a_cache_entry_is_built_once_by_concurrent_processes(tmp_path):
    """pytest-xdist workers (or two CI jobs) asking for the same real-size entry at once: one
    builds under the entry's lock, the other waits and reuses it."""
    import time

    log = tmp_path / "builds.log"
    start = time.time() + 3.0  # both children past their imports, then they go together
    procs = [subprocess.Popen([sys.executable, "-c", LOCKED_BUILD, str(tmp_path / "cache"),
                               str(log), str(start)], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    folders = {proc.communicate(timeout=120)[0].strip() for proc in procs}
    assert [p.returncode for p in procs] == [0, 0]
    assert len(folders) == 1 and Path(folders.pop()).is_dir()
    assert log.read_text().count("built") == 1


def test_bench_build_records_its_figures_as_json(bench_json, tmp_path):
    """`bench build --json`: the build child and the raw write, measured, as one results file
    on stdout (the table goes to stderr) and nothing left in the cache (it once passed an
    argument the benchmark did not take, and no test ran it)."""
    case, value, err = bench_json("build", "--preset", "tiny")
    assert case == "tiny-bin"
    assert value["build_speed_ratio"] == pytest.approx(value["raw_write_s"] / value["build_wall_s"])
    assert value["build_peak_rss"] > 0
    assert "build tiny bin" in err
    assert list(tmp_path.iterdir()) == []

"""LoRA the LLaVA way and its merge: every route to a merged model gives the unmerged model's
output, on the same text + image probe, across ranks, alphas, targets, dtypes, rsLoRA, DoRA,
bias modes and checkpoint formats.

Four outputs per case: the unmerged PEFT model (the reference), peft's merge_and_unload in
memory, the streamed `merge-lora` checkpoint reloaded through the loader's full path, and the
loader's LoRA+base path. The two routes through files must agree bit for bit (same tensors, so
same logits); the merged ones match the unmerged one within `[lora_merge.<dtype>]`, plus greedy
top-1 agreement in half precision. Each case also checks that the adapter moves the output by
more than that tolerance, so the comparison can fail.

The matrix is a covering design, not the cross product (4 x 3 x 2 x 3 x 2 x 2 x 3 x 2 = 1728
cases; about a second each). Every *pair* of axis values appears in some case (a greedy
pairwise construction, checked by a test), which catches any defect that needs two settings to
show, e.g. DoRA only breaking in float16. The risky combinations are added by name: the highest
rank in both half precisions (the update's sum over 128 products rounds hardest), DoRA in
bfloat16 (the row norm is taken over a bfloat16 weight), rsLoRA at rank 128 (its scaling is
sqrt(128) ~ 11x plain LoRA's, so a wrong formula shows most), and LLaVA's own v1.5 settings.
The full cross product runs with `--llava-slow`.
"""

from __future__ import annotations

import itertools
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from harness.checkpoint.reader import open_folder
from harness.model.probe import probe_ids, probe_logits
from harness.ops.load import LoadError, LoadWarning, load
from harness.ops.lora import (
    LoraError,
    LoraSpec,
    apply_lora,
    find_all_linear_names,
    lora_layers,
    randomize_adapter,
    save_llava_lora,
    target_names,
)
from harness.ops.merge import MergeError, Workspace, merge_lora, merge_weight
from harness.tolerances import tolerance

RANKS = (1, 8, 64, 128)
ALPHAS = ("16", "r", "2r")  # LLaVA's train.py default, scale 1, LLaVA's v1.5 scripts (256/128)
TARGETS = ("attention", "all-linear")
DTYPES = ("float32", "bfloat16", "float16")
BIASES = ("none", "all", "lora_only")
FORMATS = ("bin", "safetensors")
AXES = {"r": RANKS, "alpha": ALPHAS, "targets": TARGETS, "dtype": DTYPES, "rslora": (False, True),
        "dora": (False, True), "bias": BIASES, "fmt": FORMATS}
LM_LINEARS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
PROBE_LENGTH = 48  # text positions around the image: top-1 agreement is judged over ~50


@dataclass(frozen=True)
class Case:
    r: int
    alpha: str
    targets: str
    dtype: str
    rslora: bool
    dora: bool
    bias: str
    fmt: str

    @property
    def id(self) -> str:
        extras = [x for x, on in (("rslora", self.rslora), ("dora", self.dora)) if on]
        return "-".join([f"r{self.r}", f"a{self.alpha}",
                         "attn" if self.targets == "attention" else "all", self.dtype,
                         *extras, f"bias_{self.bias}", self.fmt])

    @property
    def spec(self) -> LoraSpec:
        alpha = {"16": 16, "r": self.r, "2r": 2 * self.r}[self.alpha]
        return LoraSpec(r=self.r, alpha=alpha, targets=self.targets, dropout=0.0,
                        bias=self.bias, rslora=self.rslora, dora=self.dora, init=False)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def pairwise(axes: dict[str, tuple]) -> list[dict]:
    """A greedy pairwise covering array: rows until every pair of values of every two axes
    appears in some row. Each row starts from the first uncovered pair and fills the other
    axes with the value covering most uncovered pairs (ties: the earlier value)."""
    names = list(axes)
    uncovered = {((a, x), (b, y)) for a, b in itertools.combinations(names, 2)
                 for x in axes[a] for y in axes[b]}
    rows = []
    while uncovered:
        (a, x), (b, y) = min(uncovered, key=lambda p: (names.index(p[0][0]),
                                                       names.index(p[1][0]), repr(p)))
        row = {a: x, b: y}
        for name in names:
            if name in row:
                continue
            row[name] = max(axes[name], key=lambda v: (
                sum(((o, row[o]), (name, v)) in uncovered or ((name, v), (o, row[o])) in
                    uncovered for o in row), -axes[name].index(v)))
        rows.append(row)
        uncovered -= {((p, row[p]), (q, row[q])) for p, q in itertools.combinations(names, 2)}
    return rows


RISKY = [
    # the highest rank in float16 (narrowest exponent range of the three)
    Case(128, "2r", "all-linear", "float16", False, False, "none", "bin"),
    # LLaVA v1.5's own LoRA settings: r 128, alpha 256, all linear, bf16
    Case(128, "2r", "all-linear", "bfloat16", False, False, "none", "safetensors"),
    # DoRA in bfloat16, with trained biases
    Case(8, "16", "all-linear", "bfloat16", False, True, "all", "bin"),
    Case(64, "2r", "attention", "bfloat16", False, True, "lora_only", "safetensors"),
    # rsLoRA at rank 128: alpha/sqrt(r) is 11x alpha/r
    Case(128, "2r", "all-linear", "float32", True, False, "none", "safetensors"),
    Case(128, "16", "attention", "bfloat16", True, True, "none", "bin"),
]
COVERING = list(dict.fromkeys([Case(**row) for row in pairwise(AXES)] + RISKY))
FULL = [Case(*values) for values in itertools.product(*AXES.values())]


# --- bases ---------------------------------------------------------------------------------

def _with_attention_bias(src: Path, out: Path, seed: int = 0) -> Path:
    """A copy of a tiny LLaVA checkpoint whose attention projections have biases (Llama's
    `attention_bias`), so the three bias modes have something to train and save."""
    if out.exists():
        return out
    shutil.copytree(src, out)
    folder = open_folder(out)
    gen = torch.Generator().manual_seed(seed)
    config = json.loads((out / "config.json").read_text())
    weight_map = dict(folder.weight_map or {})
    for file in folder.files:
        # Copies: the shard is rewritten in place, and `.bin` reads are mmap views of it.
        state = {k: v.clone() for k, v in folder.read(list(folder.header(file))).items()}
        for key in [k for k in state if k.endswith("_proj.weight") and ".self_attn." in k]:
            bias = key.removesuffix("weight") + "bias"
            state[bias] = torch.randn(state[key].shape[0], generator=gen) * 0.02
            weight_map[bias] = file
        if folder.format == "safetensors":
            from safetensors.torch import save_file

            save_file(state, out / file, metadata={"format": "pt"})
        else:
            torch.save(state, out / file)
    if folder.index_file:
        # Written twice: the new total comes from the rewritten shards' headers.
        index = {"metadata": {}, "weight_map": weight_map}
        (out / folder.index_file).write_text(json.dumps(index))
        index["metadata"]["total_size"] = sum(m.nbytes for m in open_folder(out).tensors.values())
        (out / folder.index_file).write_text(json.dumps(index))
    config["attention_bias"] = True
    config["mm_vision_tower"] = str(out / "vision_tower")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


@pytest.fixture(scope="module")
def bases(tiny_checkpoint_factory, tmp_path_factory) -> dict[str, Path]:
    """format -> a float32 tiny base with attention biases, in 2 shards."""
    root = tmp_path_factory.mktemp("lora-bases")
    return {fmt: _with_attention_bias(tiny_checkpoint_factory(checkpoint={"format": fmt,
                                                                          "shards": 2}),
                                      root / f"biased-{fmt}")
            for fmt in FORMATS}


def _load(path, base=None, **kw):
    kw.setdefault("device", "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LoadWarning)
        return load(path, base, Path(path).name, **kw)


def _probe(model, processor) -> torch.Tensor:
    ids = probe_ids(model.config.vocab_size, length=PROBE_LENGTH)
    return probe_logits(model, processor, ids=ids).float()


_PLAIN: dict = {}


def _plain_logits(base: Path, dtype: str) -> torch.Tensor:
    if (base, dtype) not in _PLAIN:
        loaded = _load(base, dtype=dtype)
        _PLAIN[base, dtype] = _probe(loaded.model, loaded.image_processor)
    return _PLAIN[base, dtype]


# --- one case ------------------------------------------------------------------------------

@dataclass
class Outputs:
    unmerged: torch.Tensor
    merged_in_memory: torch.Tensor
    reloaded: torch.Tensor
    lora_path: torch.Tensor
    plain: torch.Tensor
    adapter: Path
    merged: Path


def trained_adapter(base: Path, case: Case, out: Path, seed: int = 0):
    """A LLaVA LoRA folder for `case` (random adapter standing in for training) and the
    unmerged PEFT model with its image processor."""
    loaded = _load(base, dtype=case.dtype)
    peft_model = apply_lora(loaded.model, case.spec)
    randomize_adapter(peft_model, seed, dtype=case.torch_dtype)
    save_llava_lora(peft_model, out)
    return peft_model.eval(), loaded.image_processor


def run_case(base: Path, case: Case, tmp: Path) -> Outputs:
    peft_model, processor = trained_adapter(base, case, tmp / "llava-lora")
    unmerged = _probe(peft_model, processor)
    in_memory = _probe(peft_model.merge_and_unload(), processor)
    merge_lora(tmp / "llava-lora", base, tmp / "merged", dtype=case.dtype)
    reloaded = _load(tmp / "merged", dtype=case.dtype)
    via_lora = _load(tmp / "llava-lora", base, dtype=case.dtype)
    out = Outputs(unmerged, in_memory, _probe(reloaded.model, processor),
                  _probe(via_lora.model, processor), _plain_logits(base, case.dtype),
                  tmp / "llava-lora", tmp / "merged")
    _assert_same_tensors(tmp / "merged", via_lora.model)
    return out


def _assert_same_tensors(merged: Path, model) -> None:
    """The streamed merge wrote exactly the tensors peft's merge_and_unload made."""
    folder = open_folder(merged)
    written = folder.read(list(folder.tensors))
    state = {k: v for k, v in model.state_dict().items() if "vision_tower" not in k}
    assert set(state) <= set(written)
    differing = [k for k in state if not torch.equal(written[k], state[k])]
    assert not differing, f"{len(differing)} tensor(s) differ, e.g. {differing[0]}"


def _check_close(name: str, ours: torch.Tensor, reference: torch.Tensor, dtype: str) -> None:
    tol = tolerance(f"lora_merge.{dtype}")
    torch.testing.assert_close(ours, reference, **tol.close_kwargs(), msg=lambda m: f"{name}: {m}")
    if tol.top1 is not None:
        agree = (ours.argmax(-1) == reference.argmax(-1)).float().mean().item()
        assert agree >= tol.top1, f"{name}: top-1 agreement {agree:.3f} < {tol.top1}"


def _check_outputs(out: Outputs, case: Case) -> None:
    assert torch.equal(out.reloaded, out.lora_path), "merged checkpoint != loader LoRA path"
    _check_close("merged in memory", out.merged_in_memory, out.unmerged, case.dtype)
    _check_close("merged checkpoint", out.reloaded, out.unmerged, case.dtype)
    tol = tolerance(f"lora_merge.{case.dtype}")
    assert not torch.allclose(out.unmerged, out.plain, **tol.close_kwargs()), \
        "the adapter does not change the output: the comparison could not fail"


@pytest.mark.parametrize("case", COVERING, ids=lambda c: c.id)
def test_merge_routes_agree(bases, tmp_path, case):
    _check_outputs(run_case(bases[case.fmt], case, tmp_path), case)


def pytest_generate_tests(metafunc):
    """The full matrix is parametrized only with --llava-slow (1728 cases would take half an
    hour); without it one placeholder stands for it, skipped by the plugin's slow policy."""
    if metafunc.function.__name__ != "test_merge_routes_agree_full_matrix":
        return
    if metafunc.config.getoption("--llava-slow"):
        metafunc.parametrize("case", FULL, ids=lambda c: c.id)
    else:
        metafunc.parametrize("case", [None], ids=["full-matrix"])


@pytest.mark.slow
def test_merge_routes_agree_full_matrix(bases, tmp_path, case):
    _check_outputs(run_case(bases[case.fmt], case, tmp_path), case)


def test_matrix_covers_every_pair_and_the_risky_cases():
    for a, b in itertools.combinations(AXES, 2):
        seen = {(getattr(c, a), getattr(c, b)) for c in COVERING}
        assert seen == set(itertools.product(AXES[a], AXES[b])), (a, b)
    assert set(RISKY) <= set(COVERING)
    assert len(COVERING) < len(FULL) // 40


def test_equivalence_check_fails_on_a_wrong_scaling(bases, tmp_path):
    """Planted defect: the saved config claims rsLoRA, so both file routes scale the update
    by alpha/sqrt(r) instead of alpha/r; the comparison with the unmerged model catches it."""
    case = Case(64, "2r", "all-linear", "float32", False, False, "none", "bin")
    peft_model, processor = trained_adapter(bases["bin"], case, tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    config["use_rslora"] = True
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps(config))
    merge_lora(tmp_path / "lora", bases["bin"], tmp_path / "merged", dtype="float32")
    reloaded = _load(tmp_path / "merged", dtype="float32")
    with pytest.raises(AssertionError):
        _check_close("planted", _probe(reloaded.model, processor), _probe(peft_model, processor),
                     "float32")


def test_bit_identity_check_fails_on_one_ulp(bases, tmp_path):
    case = Case(8, "16", "attention", "bfloat16", False, False, "none", "safetensors")
    run_case(bases["safetensors"], case, tmp_path)
    model = _load(tmp_path / "llava-lora", bases["safetensors"], dtype="bfloat16").model
    weight = model.get_model().layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        weight.view(torch.int16)[0, 0] += 1  # the next bfloat16 value: one ulp
    with pytest.raises(AssertionError, match="differ"):
        _assert_same_tensors(tmp_path / "merged", model)


# The workspace path (blocks of 64 rows in reused buffers) against the plain one: shapes with a
# partial last block, one block, several; scalings that are and are not powers of two.
WORKSPACE_SHAPES = [(200, 96, 8), (64, 48, 4), (33, 70, 2), (130, 128, 16)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_the_workspace_merge_is_the_plain_merge_bit_for_bit(dtype):
    ws = Workspace()
    gen = torch.Generator().manual_seed(0)
    for rows, cols, r in WORKSPACE_SHAPES:  # one workspace, reused across shapes
        w = torch.randn(rows, cols, generator=gen).to(dtype)
        a = (torch.randn(r, cols, generator=gen) * 0.3).to(dtype)
        b = (torch.randn(rows, r, generator=gen) * 0.3).to(dtype)
        for scaling in (2.0, 1.7, 16 / r ** 0.5):
            plain = merge_weight(w, a, b, scaling)
            fast = merge_weight(w, a, b, scaling, workspace=ws)
            assert _same_bits(plain, fast), (rows, cols, r, scaling)
    fast.view(-1)[-1] = -fast.view(-1)[-1]  # the comparison itself sees one element
    assert not _same_bits(plain, fast)


def _same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.dtype == y.dtype and torch.equal(x.contiguous().view(torch.uint8),
                                              y.contiguous().view(torch.uint8))


# --- targets -------------------------------------------------------------------------------

def test_target_discovery_is_llavas_rule_without_the_vision_tower(bases):
    model = _load(bases["bin"], dtype="float32").model
    assert find_all_linear_names(model) == LM_LINEARS
    assert target_names(model, "attention") == ["q_proj", "k_proj", "v_proj", "o_proj"]
    layers = lora_layers(apply_lora(model, LoraSpec(r=4, alpha=8, targets="all-linear")))
    assert len(layers) == 7 * model.config.num_hidden_layers
    assert not [n for n in layers if "vision_tower" in n or "mm_projector" in n]


def test_short_names_alone_would_adapt_the_vision_tower(bases):
    """Why the targets are an anchored regex: LLaVA's short names, given to peft as a list,
    also match the CLIP tower's q/k/v_proj once the tower is attached."""
    from peft import LoraConfig, get_peft_model

    model = _load(bases["bin"], dtype="float32").model
    naive = get_peft_model(model, LoraConfig(r=4, target_modules=find_all_linear_names(model)))
    assert [n for n in lora_layers(naive) if "vision_tower" in n]


def test_explicit_targets(bases):
    model = _load(bases["bin"], dtype="float32").model
    layers = lora_layers(apply_lora(model, LoraSpec(r=4, alpha=8, targets=("q_proj", "v_proj"))))
    assert sorted({n.rsplit(".", 1)[-1] for n in layers}) == ["q_proj", "v_proj"]
    with pytest.raises(LoraError, match="'fc1' is not a linear layer of the language model"):
        target_names(model, ("q_proj", "fc1"))
    with pytest.raises(LoraError, match="expected attention"):
        target_names(model, "everything")


# --- saving the LLaVA way ------------------------------------------------------------------

QV = ("q_proj", "v_proj")


def _adapter_keys(folder: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(folder / "adapter_model.safetensors", framework="pt") as f:
        return set(f.keys())


def _layer_keys(layers: int, projs, suffix: str) -> set[str]:
    return {f"base_model.model.model.layers.{i}.self_attn.{p}{suffix}"
            for i in range(layers) for p in projs}


@pytest.mark.parametrize("bias", BIASES)
def test_saved_the_llava_way_in_every_bias_mode(bases, tmp_path, bias):
    loaded = _load(bases["bin"], dtype="float32")
    peft_model = apply_lora(loaded.model, LoraSpec(r=4, alpha=8, targets=QV, bias=bias,
                                                   init=False))
    randomize_adapter(peft_model, seed=3)
    out = save_llava_lora(peft_model, tmp_path / "llava-lora")
    n = loaded.model.config.num_hidden_layers
    lora = _layer_keys(n, QV, ".lora_A.weight") | _layer_keys(n, QV, ".lora_B.weight")
    projector_biases = {f"base_model.model.model.mm_projector.{i}.bias" for i in (0, 2)}
    extra = {"none": set(),
             "lora_only": _layer_keys(n, QV, ".base_layer.bias"),
             "all": _layer_keys(n, QV, ".base_layer.bias") | projector_biases
             | _layer_keys(n, ("k_proj", "o_proj"), ".bias")}[bias]
    assert _adapter_keys(out) == lora | extra
    assert json.loads((out / "adapter_config.json").read_text())["bias"] == bias
    assert json.loads((out / "config.json").read_text())["mm_vision_tower"]

    trainables = torch.load(out / "non_lora_trainables.bin", weights_only=True)
    params = dict(peft_model.named_parameters())
    projector = {f"base_model.model.model.mm_projector.{i}.{w}" for i in (0, 2)
                 for w in ("weight", "bias")}
    trained_biases = {k.replace(".base_layer.", ".") for k in extra} - projector_biases
    assert set(trainables) == projector | trained_biases
    for key, value in trainables.items():
        wrapped = key if key in params else key.replace(".bias", ".base_layer.bias")
        assert torch.equal(value, params[wrapped])

    # The loader takes it and ends with the trained biases.
    merged = _load(out, bases["bin"], dtype="float32").model.state_dict()
    for key in trained_biases:
        assert torch.equal(merged[key.removeprefix("base_model.model.")],
                           trainables[key])


def test_llavas_lora_only_bias_names_name_nothing(bases):
    """LLaVA's `get_peft_state_maybe_zero_3(bias="lora_only")` looks for `<module>.bias` next
    to each LoRA tensor; peft keeps the layer's bias at `<module>.base_layer.bias`, so even with
    its iteration bug fixed the branch would save no bias. Ours selects by module instead."""
    loaded = _load(bases["bin"], dtype="float32")
    peft_model = apply_lora(loaded.model, LoraSpec(r=4, alpha=8, targets=QV, bias="lora_only"))
    params = dict(peft_model.named_parameters())
    derived = {k.split("lora_")[0] + "bias" for k in params if "lora_" in k}
    assert not derived & set(params)
    assert {k for k in params if k.endswith(".base_layer.bias")}


# --- non_lora_trainables key prefixes --------------------------------------------------------

PREFIXES = ["base_model.model.model.", "base_model.model.", "model.", ""]
PREFIX_IDS = ["base_model.model.model", "base_model.model", "model", "bare"]


@pytest.fixture(scope="module")
def vicuna_like(tiny_checkpoint_factory, tmp_path_factory) -> tuple[Path, Path]:
    """(full tiny LLaVA, the same language model alone: no projector, with tokenizer)."""
    from harness.model.backbone import load_language_model

    src = tiny_checkpoint_factory()
    out = tmp_path_factory.mktemp("vicuna-like") / "vicuna"
    load_language_model(src).save_pretrained(out)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    return src, out


def _prefixed_adapter(src: Path, out: Path, prefix: str, drop: str | None = None) -> dict:
    trained_adapter(src, Case(4, "r", "attention", "float32", False, False, "none", "bin"), out)
    stored = torch.load(out / "non_lora_trainables.bin", weights_only=True)
    renamed = {prefix + k.removeprefix("base_model.model.model."): v for k, v in stored.items()
               if drop is None or not k.endswith(drop)}
    torch.save(renamed, out / "non_lora_trainables.bin")
    return {"model." + k.removeprefix("base_model.model.model."): v for k, v in stored.items()}


@pytest.mark.parametrize("prefix", PREFIXES, ids=PREFIX_IDS)
def test_every_trainables_prefix_loads_the_projector(vicuna_like, tmp_path, prefix):
    src, vicuna = vicuna_like
    projector = _prefixed_adapter(src, tmp_path / "lora", prefix)
    merge_lora(tmp_path / "lora", vicuna, tmp_path / "merged")
    written = open_folder(tmp_path / "merged").read(list(projector))
    loaded = _load(tmp_path / "lora", vicuna, dtype="float32").model.state_dict()
    for key, value in projector.items():
        assert torch.equal(written[key], value)
        assert torch.equal(loaded[key], value)


def test_a_projector_key_left_unloaded_is_an_error(vicuna_like, tmp_path):
    src, vicuna = vicuna_like
    _prefixed_adapter(src, tmp_path / "lora", "base_model.model.model.", drop="2.bias")
    with pytest.raises(MergeError, match=r"model\.mm_projector\.2\.bias .*would stay random"):
        merge_lora(tmp_path / "lora", vicuna, tmp_path / "merged")
    with pytest.raises(LoadError, match=r"model\.mm_projector\.2\.bias .*would stay random"):
        _load(tmp_path / "lora", vicuna, dtype="float32")
    assert not (tmp_path / "merged").exists()


def test_a_trainables_key_naming_nothing_is_an_error(vicuna_like, tmp_path):
    src, vicuna = vicuna_like
    _prefixed_adapter(src, tmp_path / "lora", "base_model.model.model.model.")
    with pytest.raises(LoadError, match="matches no tensor of the model"):
        merge_lora(tmp_path / "lora", vicuna, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


# --- broken adapters -----------------------------------------------------------------------

@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_non_finite_adapter_is_refused_and_nothing_written(bases, tmp_path, value):
    from safetensors.torch import load_file, save_file

    trained_adapter(bases["bin"], Case(8, "16", "attention", "bfloat16", False, False, "none",
                                       "bin"), tmp_path / "lora")
    path = tmp_path / "lora" / "adapter_model.safetensors"
    state = load_file(path)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    state[key][3, 0] = value
    save_file(state, path)
    with pytest.raises(MergeError, match=r"non-finite .* model\.layers\.1\.self_attn\.v_proj"):
        merge_lora(tmp_path / "lora", bases["bin"], tmp_path / "merged", dtype="bfloat16")
    assert not (tmp_path / "merged").exists()
    assert not list(tmp_path.glob(".merged*"))


def test_non_finite_trainables_are_refused(bases, tmp_path):
    trained_adapter(bases["bin"], Case(8, "16", "attention", "float32", False, False, "none",
                                       "bin"), tmp_path / "lora")
    path = tmp_path / "lora" / "non_lora_trainables.bin"
    state = torch.load(path, weights_only=True)
    state["base_model.model.model.mm_projector.0.weight"][0, 0] = float("nan")
    torch.save(state, path)
    with pytest.raises(MergeError, match=r"non_lora_trainables.bin: .*mm_projector\.0\.weight"):
        merge_lora(tmp_path / "lora", bases["bin"], tmp_path / "merged")


def _short_name_adapter(base: Path, out: Path, init: bool) -> Path:
    """A LoRA made as LLaVA would with the CLIP tower already attached: short target names, so
    the tower's q/k/v_proj get adapters too, saved by plain peft."""
    from peft import LoraConfig, get_peft_model

    model = _load(base, dtype="float32").model
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=init,
                                                  target_modules=find_all_linear_names(model)))
    peft_model.save_pretrained(out)
    torch.save({f"base_model.model.{k}": v for k, v in model.state_dict().items()
                if "mm_projector" in k}, out / "non_lora_trainables.bin")
    shutil.copy(base / "config.json", out / "config.json")
    return out


def _peft_as_the_loader_builds_it(base: Path, adapter: Path):
    """The loader's LoRA path applies the adapter before the vision tower is loaded."""
    from peft import PeftModel

    from harness.model.config import llava_config
    from harness.model.llava import MODEL_CLASSES

    arch, config = llava_config(adapter)
    model = MODEL_CLASSES[arch].from_pretrained(base, config=config)
    return PeftModel.from_pretrained(model, adapter)


def test_an_untrained_vision_tower_adapter_is_dropped(bases, tmp_path):
    from harness.ops.adapter import unapplied_adapter_problems

    adapter = _short_name_adapter(bases["bin"], tmp_path / "lora", init=True)
    result = merge_lora(adapter, bases["bin"], tmp_path / "merged")
    assert len(result.dropped) == 3 * 2 and all("vision_tower" in d for d in result.dropped)
    assert not unapplied_adapter_problems(_peft_as_the_loader_builds_it(bases["bin"], adapter),
                                          adapter)


def test_a_vision_tower_adapter_that_changes_it_is_refused(bases, tmp_path):
    """The loader's peft call drops these tensors silently; the merge refuses them, and
    `unapplied_adapter_problems` is the check a loader can run (see the report)."""
    from harness.ops.adapter import unapplied_adapter_problems

    adapter = _short_name_adapter(bases["bin"], tmp_path / "lora", init=False)
    with pytest.raises(MergeError, match="changes the vision tower"):
        merge_lora(adapter, bases["bin"], tmp_path / "merged")
    problems = unapplied_adapter_problems(_peft_as_the_loader_builds_it(bases["bin"], adapter),
                                          adapter)
    assert len(problems) == 2 * 3 * 2 and "vision_tower" in problems[0]


def test_an_adapter_for_a_module_the_base_lacks_is_refused(bases, tiny_checkpoint_factory,
                                                           tmp_path):
    """Biases trained on a base with attention biases cannot go into one without."""
    trained_adapter(bases["bin"], Case(4, "r", "attention", "float32", False, False, "all",
                                       "bin"), tmp_path / "lora")
    plain_base = tiny_checkpoint_factory()
    with pytest.raises(LoadError, match=r"non_lora_trainables.bin: key .*_proj\.bias"):
        merge_lora(tmp_path / "lora", plain_base, tmp_path / "merged")
    path = tmp_path / "lora" / "non_lora_trainables.bin"
    torch.save({k: v for k, v in torch.load(path, weights_only=True).items()
                if "mm_projector" in k}, path)
    with pytest.raises(MergeError, match=r"_proj\.bias, which the base checkpoint does not"):
        merge_lora(tmp_path / "lora", plain_base, tmp_path / "merged")


# --- the command line ----------------------------------------------------------------------

def _cli(capsys, *args) -> tuple[int, str, str]:
    from harness.cli.app import main as cli_main

    try:
        code = cli_main([str(a) for a in args])
    except SystemExit as exc:  # argparse rejects bad option values this way
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(result, *fragments) -> None:
    code, _, stderr = result
    assert code == 2, stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_merge_lora_cli(bases, tmp_path, capsys):
    case = Case(8, "2r", "all-linear", "float32", False, False, "none", "safetensors")
    trained_adapter(bases["safetensors"], case, tmp_path / "lora")
    code, out, err = _cli(capsys, "merge-lora", "--adapter", tmp_path / "lora", "--base",
                          bases["safetensors"], "-o", tmp_path / "merged", "--dtype", "bfloat16",
                          "--json")
    assert code == 0, err
    assert "merged 14 layer(s)" in err  # --json: the usual lines on stderr, JSON on stdout
    summary = json.loads(out)
    assert summary["merged_layers"] == 14 and summary["dtype"] == "bfloat16"
    folder = open_folder(tmp_path / "merged")
    assert folder.files == open_folder(bases["safetensors"]).files  # the base's split
    assert {m.dtype for k, m in folder.tensors.items() if "inv_freq" not in k} == {"bfloat16"}
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["torch_dtype"] == \
        "bfloat16"
    assert (tmp_path / "merged" / "tokenizer.model").is_file()
    # LLaVA's own flags (scripts/merge_lora_weights.py) name the same thing.
    code, _, err = _cli(capsys, "merge-lora", "--model-path", tmp_path / "lora", "--model-base",
                        bases["safetensors"], "--save-model-path", tmp_path / "merged2",
                        "--dtype", "bfloat16")
    assert code == 0, err
    a, b = open_folder(tmp_path / "merged"), open_folder(tmp_path / "merged2")
    assert all(torch.equal(a.read([k])[k], b.read([k])[k]) for k in a.tensors)


def test_merge_lora_cli_bad_inputs(bases, tmp_path, capsys):
    case = Case(4, "r", "attention", "float32", False, False, "none", "bin")
    trained_adapter(bases["bin"], case, tmp_path / "lora")
    base = bases["bin"]
    (tmp_path / "taken").mkdir()
    _one_line_error(_cli(capsys, "merge-lora", "--adapter", tmp_path / "lora", "--base", base,
                         "-o", tmp_path / "taken"), "already exists", "--force")
    _one_line_error(_cli(capsys, "merge-lora", "--adapter", base, "--base", base, "-o",
                         tmp_path / "x"), "adapter_config.json: missing")
    _one_line_error(_cli(capsys, "merge-lora", "--adapter", tmp_path / "lora", "--base",
                         tmp_path / "lora", "-o", tmp_path / "lora" / "out"), "inside an input")
    _one_line_error(_cli(capsys, "merge-lora", "--adapter", tmp_path / "lora", "--base", base,
                         "-o", tmp_path / "y", "--dtype", "int8"), "--dtype", "int8")
    _one_line_error(_cli(capsys, "merge-lora", "--adapter", tmp_path / "lora", "--base", base,
                         "-o", tmp_path / "z", "--device", "tpu"), "--device", "tpu")
    config_file = tmp_path / "lora" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    for change, fragment in (({"r": 5}, "do not fit rank 5"),
                             ({"lora_bias": True}, "lora_bias=True is not supported"),
                             ({"peft_type": "IA3"}, "peft_type is 'IA3', expected one of 'LORA'")):
        config_file.write_text(json.dumps({**config, **change}))
        _one_line_error(_cli(capsys, "merge-lora", "--adapter", tmp_path / "lora", "--base",
                             base, "-o", tmp_path / "w"), "adapter_config.json"
                        if "rank" not in fragment else "adapter_model", fragment)
    assert not [p for p in tmp_path.iterdir() if p.name not in ("lora", "taken")]


@pytest.mark.slow  # starts child processes, a torch import each
def test_bench_merge_runs_on_a_tiny_base(bases, tmp_path, capsys):
    from harness.report.results import load_results

    code, out, err = _cli(capsys, "bench", "merge", "--base", bases["safetensors"], "--rank", 4,
                          "--alpha", 8, "--work", tmp_path / "work", "--naive", "-o",
                          tmp_path / "merge.json")
    assert code == 0, err
    assert "bit-identical" in out
    record = load_results(tmp_path / "merge.json").records[0]
    assert record.outcome == "passed" and record.metrics["merged_layers"].value == 14
    assert "naive_wall_s" in record.metrics
    assert not list((tmp_path / "work").iterdir())


@pytest.mark.gpu
def test_merge_on_cuda_matches_the_unmerged_model(bases, tmp_path):
    case = Case(128, "2r", "all-linear", "bfloat16", False, True, "none", "safetensors")
    peft_model, processor = trained_adapter(bases["safetensors"], case, tmp_path / "lora")
    merge_lora(tmp_path / "lora", bases["safetensors"], tmp_path / "merged", dtype="bfloat16",
               device="cuda")
    reloaded = _load(tmp_path / "merged", dtype="bfloat16")
    _check_close("merged on cuda", _probe(reloaded.model, processor),
                 _probe(peft_model, processor), "bfloat16")


# --- training in miniature -----------------------------------------------------------------

def _trainable_base(factory, dtype: str = "float32") -> Path:
    # bitsandbytes' CPU 4-bit kernel packs 64-column blocks: intermediate 192, not 172.
    return factory(model={"dtype": dtype, "intermediate_size": 192})


def test_lora_training_in_miniature_the_llava_way(tiny_checkpoint_factory, tmp_path):
    from harness.train.lora import lora_model, param_groups, train_lora, update_problems

    base = _trainable_base(tiny_checkpoint_factory)
    loaded = _load(base, dtype="float32")
    peft_model = lora_model(loaded.model, LoraSpec(r=8, alpha=16))
    groups = param_groups(peft_model, lr=2e-3, mm_projector_lr=2e-4)
    projector = {id(p) for p in peft_model.get_model().mm_projector.parameters()}
    for group in groups:
        ids = {id(p) for p in group["params"]}
        assert ids <= projector if group["lr"] == 2e-4 else not ids & projector
    run = train_lora(peft_model, loaded.tokenizer, loaded.image_processor, steps=6, lr=2e-3,
                     mm_projector_lr=2e-4)
    assert run.held_out_after < run.held_out_before
    assert update_problems(run.before, peft_model) == []
    with torch.no_grad():  # planted: a frozen weight moved
        peft_model.get_model().layers[0].mlp.up_proj.base_layer.weight[0, 0] += 1e-3
    assert update_problems(run.before, peft_model) == [
        "base_model.model.model.layers.0.mlp.up_proj.base_layer.weight (frozen) changed"]
    with torch.no_grad():
        peft_model.get_model().layers[0].mlp.up_proj.base_layer.weight[0, 0] -= 1e-3

    save_llava_lora(peft_model, tmp_path / "llava-lora")
    merge_lora(tmp_path / "llava-lora", base, tmp_path / "merged")
    unmerged = _probe(peft_model, loaded.image_processor)
    reloaded = _load(tmp_path / "merged", dtype="float32")
    _check_close("trained, merged", _probe(reloaded.model, loaded.image_processor), unmerged,
                 "float32")


def test_mm_projector_lr_is_the_projectors_own(tiny_checkpoint_factory):
    from harness.train.lora import lora_model, train_lora

    loaded = _load(_trainable_base(tiny_checkpoint_factory), dtype="float32")
    peft_model = lora_model(loaded.model, LoraSpec(r=4, alpha=8))
    run = train_lora(peft_model, loaded.tokenizer, loaded.image_processor, steps=3, batch_size=2,
                     lr=2e-3, mm_projector_lr=0.0)
    after = dict(peft_model.named_parameters())
    moved = {k for k, v in run.before.items() if not torch.equal(v, after[k])}
    assert moved and all("lora_" in k for k in moved)  # the projector, at lr 0, stayed


def test_qlora_on_cpu_and_the_merge_drift(tiny_checkpoint_factory, tmp_path, llava_record):
    """QLoRA trains against NF4 weights. Merged onto the dequantized base (what it saw) the
    result matches the QLoRA model; merged onto the original float16 base (the usual practice)
    it carries the whole quantization error (peft #2105). Both drifts are recorded."""
    from harness.train.lora import dequantized_base, lora_model, train_lora

    base = _trainable_base(tiny_checkpoint_factory, "float16")
    loaded = _load(base, dtype="bfloat16", load_4bit=True)
    peft_model = lora_model(loaded.model, LoraSpec(r=8, alpha=16), qlora=True)
    run = train_lora(peft_model, loaded.tokenizer, loaded.image_processor, steps=4, lr=2e-3,
                     mm_projector_lr=2e-4)
    assert run.held_out_after < run.held_out_before
    save_llava_lora(peft_model, tmp_path / "qlora")
    config_file = tmp_path / "qlora" / "config.json"
    assert "quantization_config" not in json.loads(config_file.read_text())
    # LLaVA's own saver leaves the 4-bit quantization_config in: the merge must drop it.
    quant = peft_model.get_base_model().config.quantization_config
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "quantization_config": quant.to_dict()}))
    reference = _probe(peft_model, loaded.image_processor)
    dequantized_base(peft_model, base, tmp_path / "dequantized")
    drift = {}
    for name, onto in (("fp16_base", base), ("dequantized_base", tmp_path / "dequantized")):
        merge_lora(tmp_path / "qlora", onto, tmp_path / f"merged-{name}", dtype="float16")
        merged = _load(tmp_path / f"merged-{name}", dtype="float16")
        logits = _probe(merged.model, loaded.image_processor)
        drift[name] = ((logits - reference).abs().max().item(),
                       (logits.argmax(-1) == reference.argmax(-1)).float().mean().item())
        llava_record(f"qlora_drift_{name}_max_abs", drift[name][0], "logit", "lower")
        llava_record(f"qlora_top1_{name}", drift[name][1], "ratio", "higher")
    tol = tolerance("lora_merge.qlora_dequantized")
    assert drift["dequantized_base"][0] <= tol.atol, drift
    assert drift["dequantized_base"][1] >= tol.top1, drift
    assert drift["fp16_base"][0] > drift["dequantized_base"][0], drift


@pytest.mark.realsize
def test_streamed_merge_into_a_real_size_checkpoint(realsize_checkpoint_factory, tmp_path,
                                                    llava_record):
    """llava-v1.5-7b (13.5 GB), rank 8 all-linear, bfloat16: the merged tensors checked against
    an independent formula; time and memory recorded (`bench merge` is the full benchmark)."""
    from harness.bench.merge import MergeBench, measure

    base = realsize_checkpoint_factory("llava-v1.5-7b", checkpoint={"format": "safetensors"})
    figures = measure(MergeBench(base=base, case="llava-v1.5-7b", rank=8, alpha=16,
                                 work=tmp_path / "work"))
    assert figures["problems"] == []
    assert figures["merged_layers"] == 7 * 32
    llava_record("merge_wall_s", figures["wall_s"], "s")
    llava_record("merge_peak_anon", figures["peak_anon"] / 2**20, "MiB")

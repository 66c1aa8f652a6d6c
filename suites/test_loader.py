"""`load_pretrained_model`: every load path gives the full model's logits, on tiny checkpoints.

The full model itself is checked against a hand computation (CLIP hidden layer -2 without CLS,
the projector as functional ops, the embeddings spliced by index, transformers' plain Llama /
Mistral on `inputs_embeds`), bit for bit in every dtype. The projector-only path must then be
bit-identical to the full model and the LoRA path within the tolerance in fixtures/. Each check
is also run against a planted perturbation to show it would fail.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from harness.checkpoint.reader import open_folder
from harness.cli.app import main as cli_main
from harness.model.backbone import load_language_model
from harness.model.images import process_images
from harness.model.probe import probe_ids, probe_image, probe_logits
from harness.model.splice import IMAGE_TOKEN_INDEX
from harness.model.vision import ORIGINAL_CLIP_ATTENTION
from harness.ops.load import LoadError, LoadWarning, load, load_pretrained_model
from harness.tolerances import tolerance

ARCHES = ("llama", "mistral")
FORMATS = ("bin", "safetensors")
DTYPES = ("float32", "float16", "bfloat16")
# bitsandbytes' CPU 4-bit kernel packs weights in blocks of 32 rows x 64 columns: the quantized
# cases use an intermediate size that divides (the tiny default's 172 does not).
QUANT_MODEL = {"intermediate_size": 192}
LM_LINEARS = r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"


@dataclass(frozen=True)
class Case:
    arch: str
    fmt: str
    dtype: str

    @property
    def id(self) -> str:
        return f"{self.arch}-{self.fmt}-{self.dtype}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


CASES = [Case(a, f, d) for a in ARCHES for f in FORMATS for d in DTYPES]


def _build(factory, case: Case, **model) -> Path:
    return factory(model={"arch": case.arch, "dtype": case.dtype, **model},
                   checkpoint={"format": case.fmt})


def _load(path, base=None, name=None, **kw):
    """Load on CPU; the folder-name warning is tested on its own, not repeated everywhere."""
    kw.setdefault("device", "cpu")
    if name is not None:
        return load(path, base, name, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LoadWarning)
        return load(path, base, Path(path).name, **kw)


# --- the hand computation the full model is checked against --------------------------------

def _hand_logits(folder: Path, dtype: torch.dtype, ids: torch.Tensor) -> torch.Tensor:
    """Logits for one image token in `ids`, computed without the harness's model classes."""
    from transformers import CLIPImageProcessor, CLIPVisionModel

    config = json.loads((folder / "config.json").read_text())
    lm = load_language_model(folder)  # stored in `dtype`; no cast: rotary buffers stay float32
    processor = CLIPImageProcessor.from_pretrained(folder / "vision_tower")
    # As the original: the tower stays float32 (device_map "auto"), images arrive in the model
    # dtype and the features go back to it; attention computed the transformers-4.37 way.
    clip = CLIPVisionModel.from_pretrained(folder / "vision_tower", dtype=torch.float32,
                                           attn_implementation=ORIGINAL_CLIP_ATTENTION).eval()
    proj = open_folder(folder).read([k for k in open_folder(folder).tensors
                                     if k.startswith("model.mm_projector.")])
    with torch.no_grad():
        pixels = process_images([probe_image()], processor, _Cfg(config)).to(dtype)
        hidden = clip(pixels.float(), output_hidden_states=True).hidden_states[-2][:, 1:]
        hidden = hidden.to(dtype)
        x = F.linear(hidden, proj["model.mm_projector.0.weight"],
                     proj["model.mm_projector.0.bias"])
        x = F.linear(F.gelu(x), proj["model.mm_projector.2.weight"],
                     proj["model.mm_projector.2.bias"])
        at = int(torch.where(ids[0] == IMAGE_TOKEN_INDEX)[0])
        embed = lm.model.embed_tokens
        embeds = torch.cat([embed(ids[0, :at]), x[0], embed(ids[0, at + 1:])])[None]
        return lm(inputs_embeds=embeds).logits


class _Cfg:
    def __init__(self, data: dict):
        self.__dict__.update(data)


# --- the load paths ------------------------------------------------------------------------

def _projector_folder(src: Path, out: Path) -> Path:
    """What stage-1 training leaves: config.json and mm_projector.bin with full model keys."""
    out.mkdir(parents=True, exist_ok=True)
    folder = open_folder(src)
    keys = [k for k in folder.tensors if k.startswith("model.mm_projector.")]
    torch.save(folder.read(keys), out / "mm_projector.bin")
    shutil.copy(src / "config.json", out / "config.json")
    return out


def _language_model_base(src: Path, out: Path) -> Path:
    """A Vicuna-like base: the language model alone, no projector, with tokenizer."""
    if not out.exists():
        lm = load_language_model(src)
        lm.save_pretrained(out)
        for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json"):
            if (src / name).exists():
                shutil.copy(src / name, out / name)
    return out


def _lora_folder(src: Path, out: Path, dtype: torch.dtype, seed: int = 0) -> tuple[Path, object]:
    """A LoRA the LLaVA way: adapter via save_pretrained, the projector (changed, so it
    matters) in non_lora_trainables.bin under base_model.model.model.mm_projector.*, and
    config.json. Returns the folder and the unmerged PEFT model it came from."""
    from peft import LoraConfig, get_peft_model

    model = _load(src, dtype="float32").model
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.get_model().mm_projector.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    # The language model's linears only (a regex: short names would also match the CLIP
    # tower's q/k/v_proj, which is not loaded yet when the loader applies the adapter).
    config = LoraConfig(r=8, lora_alpha=16, target_modules=LM_LINEARS, init_lora_weights=False,
                        lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out)
    trainables = {f"base_model.model.{k}": v.detach().clone()
                  for k, v in peft_model.base_model.model.state_dict().items()
                  if "mm_projector" in k}
    torch.save(trainables, out / "non_lora_trainables.bin")
    shutil.copy(src / "config.json", out / "config.json")
    return out, peft_model.to(dtype).eval()


# --- full model ----------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_full_model_equals_hand_computation(tiny_checkpoint_factory, case):
    folder = _build(tiny_checkpoint_factory, case)
    loaded = _load(folder, dtype=case.dtype)
    assert (loaded.kind, loaded.arch) == ("llava", case.arch)
    ids = probe_ids(512)
    ours = probe_logits(loaded.model, loaded.image_processor, ids=ids)
    assert ours.dtype == case.torch_dtype
    assert torch.equal(ours, _hand_logits(folder, case.torch_dtype, ids))


def test_full_model_check_fails_on_a_perturbed_weight(tiny_checkpoint_factory, tmp_path):
    case = Case("llama", "safetensors", "float32")
    folder = _build(tiny_checkpoint_factory, case)
    ids = probe_ids(512)
    expected = _hand_logits(folder, torch.float32, ids)
    loaded = _load(folder, dtype="float32")
    with torch.no_grad():
        loaded.model.get_model().layers[1].mlp.down_proj.weight[3, 5] += 1e-3
    assert not torch.equal(probe_logits(loaded.model, loaded.image_processor, ids=ids),
                           expected)


# --- projector-only ------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_projector_only_is_bit_identical_to_full(tiny_checkpoint_factory, tmp_path, case):
    folder = _build(tiny_checkpoint_factory, case)
    full = _load(folder, dtype=case.dtype)
    base = _language_model_base(folder, tmp_path / "vicuna-like")
    proj = _projector_folder(folder, tmp_path / "stage1")
    loaded = _load(proj, base, dtype=case.dtype)
    assert loaded.kind == "projector"
    assert torch.equal(probe_logits(loaded.model, loaded.image_processor),
                       probe_logits(full.model, full.image_processor))


def test_projector_only_check_fails_on_a_perturbed_projector(tiny_checkpoint_factory, tmp_path):
    folder = _build(tiny_checkpoint_factory, Case("llama", "bin", "float32"))
    full = _load(folder, dtype="float32")
    proj = _projector_folder(folder, tmp_path / "stage1")
    weights = torch.load(proj / "mm_projector.bin", weights_only=True)
    weights["model.mm_projector.2.bias"][0] += 1e-3
    torch.save(weights, proj / "mm_projector.bin")
    loaded = _load(proj, folder, dtype="float32")
    assert not torch.equal(probe_logits(loaded.model, loaded.image_processor),
                           probe_logits(full.model, full.image_processor))


# --- LoRA ----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_lora_merged_matches_unmerged(tiny_checkpoint_factory, tmp_path, case):
    folder = _build(tiny_checkpoint_factory, case)
    base = _language_model_base(folder, tmp_path / "vicuna-like")
    adapter, unmerged = _lora_folder(folder, tmp_path / "llava-lora", case.torch_dtype)
    loaded = _load(adapter, base, dtype=case.dtype)
    assert loaded.kind == "lora"
    tol = tolerance(f"loader.lora_merge.{case.dtype}")
    merged = probe_logits(loaded.model, loaded.image_processor).float()
    reference = probe_logits(unmerged, loaded.image_processor).float()
    torch.testing.assert_close(merged, reference, **tol.close_kwargs())
    # The adapter and the trainables changed the model: the check above can fail.
    plain = _load(folder, dtype=case.dtype)
    assert not torch.allclose(merged, probe_logits(plain.model, plain.image_processor).float(),
                              **tol.close_kwargs())


@pytest.mark.parametrize("prefix", ["base_model.model.model.", "base_model.model.", "model.", ""],
                         ids=["base_model.model.model", "base_model.model", "model", "bare"])
def test_non_lora_trainables_prefixes_all_load_the_projector(tiny_checkpoint_factory, tmp_path,
                                                              prefix):
    folder = _build(tiny_checkpoint_factory, Case("llama", "bin", "float32"))
    base = _language_model_base(folder, tmp_path / "vicuna-like")
    adapter, _ = _lora_folder(folder, tmp_path / "lora", torch.float32)
    stored = torch.load(adapter / "non_lora_trainables.bin", weights_only=True)
    renamed = {prefix + k.removeprefix("base_model.model.model."): v for k, v in stored.items()}
    torch.save(renamed, adapter / "non_lora_trainables.bin")
    model = _load(adapter, base, dtype="float32").model
    for key, value in stored.items():
        target = "model." + key.removeprefix("base_model.model.model.")
        assert torch.equal(model.state_dict()[target], value)


def test_lora_without_projector_anywhere_is_an_error(tiny_checkpoint_factory, tmp_path):
    folder = _build(tiny_checkpoint_factory, Case("llama", "bin", "float32"))
    base = _language_model_base(folder, tmp_path / "vicuna-like")
    adapter, _ = _lora_folder(folder, tmp_path / "lora", torch.float32)
    (adapter / "non_lora_trainables.bin").unlink()
    with pytest.raises(LoadError, match="projector would stay random"):
        _load(adapter, base, dtype="float32")


# --- names and signature -------------------------------------------------------------------

def test_folder_names_do_not_decide_the_path(tiny_checkpoint_factory, tmp_path):
    folder = _build(tiny_checkpoint_factory, Case("llama", "bin", "float32"))
    plain_name = tmp_path / "model-a"
    shutil.copytree(folder, plain_name)
    with pytest.warns(LoadWarning, match="the files say 'llava'"):
        loaded = _load(plain_name, name=plain_name.name, dtype="float32")
    reference = _load(folder, dtype="float32")
    assert loaded.kind == "llava"
    assert torch.equal(probe_logits(loaded.model, loaded.image_processor),
                       probe_logits(reference.model, reference.image_processor))
    proj = _projector_folder(folder, tmp_path / "checkpoint-5000")
    assert _load(proj, folder, dtype="float32").kind == "projector"


def test_original_signature_and_return(tiny_checkpoint_factory):
    folder = _build(tiny_checkpoint_factory, Case("llama", "bin", "float32"))
    tokenizer, model, processor, context_len = load_pretrained_model(
        str(folder), None, "llava-tiny", device="cpu")
    assert model.dtype == torch.float16  # the original's default
    assert processor is not None and context_len == 2048
    assert len(tokenizer) == model.config.vocab_size
    # The original's default device_map "auto" leaves the tower float32 (no cast).
    assert model.get_vision_tower().dtype == torch.float32


def test_name_rule_is_available(tiny_checkpoint_factory):
    folder = _build(tiny_checkpoint_factory, Case("llama", "bin", "float32"))
    # The original's rule: no 'llava' in the name -> plain language model, which transformers
    # cannot build from `model_type: llava` (LLaVA issues #1510/#402): a clear error.
    with pytest.raises(Exception, match="llava|Llava|model_type"):
        _load(folder, name="vicuna-tiny", detect="name")


# --- quantized -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_quantized_keeps_projector_and_tower_and_stays_close(tiny_checkpoint_factory, mode):
    folder = _build(tiny_checkpoint_factory, Case("llama", "bin", "float32"), **QUANT_MODEL)
    reference = _load(folder, dtype="float32")
    loaded = _load(folder, dtype="float16", load_4bit=mode == "4bit", load_8bit=mode == "8bit")
    inner = loaded.model.get_model()
    assert type(inner.layers[0].self_attn.q_proj).__module__.startswith("bitsandbytes")
    for module in inner.mm_projector.modules():
        assert not type(module).__module__.startswith("bitsandbytes")
    assert {p.dtype for p in inner.mm_projector.parameters()} == {torch.float16}
    assert {p.dtype for p in inner.vision_tower.parameters()} == {torch.float32}
    tol = tolerance(f"loader.quantized.{mode}")
    ours = probe_logits(loaded.model, loaded.image_processor).float()
    ref = probe_logits(reference.model, reference.image_processor)
    torch.testing.assert_close(ours, ref, **tol.close_kwargs())
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= tol.top1


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["none", "4bit", "8bit"])
def test_loads_on_cuda(tiny_checkpoint_factory, mode):
    folder = _build(tiny_checkpoint_factory, Case("llama", "safetensors", "float32"),
                    **QUANT_MODEL)
    reference = _load(folder, dtype="float32")
    loaded = load(folder, None, "llava-tiny", device="cuda", dtype="float16",
                  load_4bit=mode == "4bit", load_8bit=mode == "8bit")
    assert loaded.model.device.type == "cuda"
    tol = tolerance(f"loader.quantized.{'8bit' if mode == 'none' else mode}")
    ours = probe_logits(loaded.model, loaded.image_processor).float().cpu()
    torch.testing.assert_close(ours, probe_logits(reference.model, reference.image_processor),
                               **tol.close_kwargs())


# --- bad input: one line, exit 2 ------------------------------------------------------------

def _cli_load(capsys, *args) -> tuple[int, str]:
    """The CLI in-process (a subprocess per case costs an import of torch + transformers)."""
    code = cli_main(["load", *map(str, args), "--device", "cpu"])
    return code, capsys.readouterr().err


def _one_line_error(result, *fragments):
    code, stderr = result
    assert code == 2, stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_bad_inputs_are_one_clear_line(tiny_checkpoint_factory, tmp_path, capsys):
    folder = _build(tiny_checkpoint_factory, Case("llama", "safetensors", "float32"))
    adapter, _ = _lora_folder(folder, tmp_path / "lora", torch.float32)
    _one_line_error(_cli_load(capsys, adapter), "needs a base model")

    proj = _projector_folder(folder, tmp_path / "stage1")
    _one_line_error(_cli_load(capsys, proj), "needs a base model")

    wrong = _projector_folder(folder, tmp_path / "wrong-type")
    weights = torch.load(wrong / "mm_projector.bin", weights_only=True)
    torch.save({"model.mm_projector.weight": weights["model.mm_projector.0.weight"],
                "model.mm_projector.bias": weights["model.mm_projector.0.bias"]},
               wrong / "mm_projector.bin")
    _one_line_error(_cli_load(capsys, wrong, "--base", folder), "mm_projector.bin",
                    "linear", "mlp2x_gelu")

    no_tower = tmp_path / "no-tower"
    shutil.copytree(folder, no_tower)
    shutil.rmtree(no_tower / "vision_tower")
    config = json.loads((no_tower / "config.json").read_text())
    config["mm_vision_tower"] = str(no_tower / "vision_tower")
    (no_tower / "config.json").write_text(json.dumps(config))
    _one_line_error(_cli_load(capsys, no_tower), "vision tower folder not found")

    truncated = tmp_path / "truncated"
    shutil.copytree(folder, truncated)
    shard = min(truncated.glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    _one_line_error(_cli_load(capsys, truncated), shard.name)


def test_projector_keys_of_the_wrong_type_in_a_full_checkpoint(tiny_checkpoint_factory,
                                                              tmp_path):
    folder = _build(tiny_checkpoint_factory, Case("llama", "bin", "float32"))
    lying = tmp_path / "llava-lying-config"
    shutil.copytree(folder, lying)
    config = json.loads((lying / "config.json").read_text())
    config["mm_projector_type"] = "linear"
    (lying / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match="projector tensors are mlp2x_gelu.*'linear'"):
        _load(lying, dtype="float32")


def test_cli_reports_what_it_loaded(tiny_checkpoint_factory, capsys):
    folder = _build(tiny_checkpoint_factory, Case("llama", "bin", "float32"))
    assert cli_main(["load", str(folder), "--device", "cpu", "--dtype", "float32",
                     "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    spec = tiny_checkpoint_factory.spec_of(folder).model
    projector = spec.mm_hidden_size * spec.hidden_size + spec.hidden_size \
        + spec.hidden_size * spec.hidden_size + spec.hidden_size
    assert facts["kind"] == "llava" and facts["architecture"] == "llama"
    assert facts["projector_type"] == "mlp2x_gelu"
    assert facts["parameters_projector"] == projector
    assert facts["dtype"] == "float32" and facts["device"] == "cpu"
    assert facts["load_s"] > 0 and facts["memory_footprint_bytes"] > 0


@pytest.mark.parametrize("arch", ARCHES)
def test_plain_language_model_path(tiny_checkpoint_factory, tmp_path, arch):
    """A Vicuna-like folder loads as a plain LM; its text logits are the LLaVA model's."""
    folder = _build(tiny_checkpoint_factory, Case(arch, "safetensors", "float32"))
    base = _language_model_base(folder, tmp_path / "vicuna-like")
    plain = _load(base, name="vicuna-tiny", dtype="float32")
    assert (plain.kind, plain.arch, plain.image_processor) == ("language_model", arch, None)
    full = _load(folder, dtype="float32")
    ids = probe_ids(512, images=0)
    with torch.no_grad():
        assert torch.equal(plain.model(input_ids=ids).logits, full.model(input_ids=ids).logits)


def test_plain_language_model_lora_path(tiny_checkpoint_factory, tmp_path):
    from peft import LoraConfig, get_peft_model

    folder = _build(tiny_checkpoint_factory, Case("llama", "safetensors", "float32"))
    base = _language_model_base(folder, tmp_path / "vicuna-like")
    lm = _load(base, dtype="float32").model
    peft_model = get_peft_model(lm, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                               init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "vicuna-lora")
    loaded = _load(tmp_path / "vicuna-lora", base, dtype="float32")
    assert loaded.kind == "language_model_lora"
    ids = probe_ids(512, images=0)
    tol = tolerance("loader.lora_merge.float32")
    with torch.no_grad():
        merged, unmerged = loaded.model(input_ids=ids).logits, peft_model(input_ids=ids).logits
        torch.testing.assert_close(merged, unmerged, **tol.close_kwargs())
        assert not torch.allclose(merged, _load(base, dtype="float32").model(
            input_ids=ids).logits, **tol.close_kwargs())


# --- adapters the original would load wrongly without a word --------------------------------

def test_a_non_finite_adapter_is_refused(tiny_checkpoint_factory, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _build(tiny_checkpoint_factory, Case("llama", "bin", "float32"))
    adapter, _ = _lora_folder(folder, tmp_path / "lora", torch.float32)
    weights = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in weights if "lora_B" in k)
    weights[key][0, 0] = float("nan")
    save_file(weights, adapter / "adapter_model.safetensors")
    with pytest.raises(LoadError, match="non-finite values in"):
        _load(adapter, folder, dtype="float32")


def test_adapter_tensors_that_find_no_module_are_refused(tiny_checkpoint_factory, tmp_path):
    """A LoRA on the CLIP tower (short target names) cannot be applied by the loader, which
    attaches the adapter before the tower is loaded; peft would drop it silently."""
    from peft import LoraConfig, get_peft_model

    folder = _build(tiny_checkpoint_factory, Case("llama", "bin", "float32"))
    model = _load(folder, dtype="float32").model
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "lora")
    shutil.copy(folder / "config.json", tmp_path / "lora" / "config.json")
    with pytest.raises(LoadError, match="vision_tower.*matches no module"):
        _load(tmp_path / "lora", folder, dtype="float32")


def test_wrapped_bias_names_and_a_qlora_config_load(tiny_checkpoint_factory, tmp_path):
    """LLaVA's saver writes `...q_proj.base_layer.bias`-style trainables and QLoRA leaves its
    quantization_config in config.json; both load onto an unquantized base."""
    folder = _build(tiny_checkpoint_factory, Case("llama", "bin", "float32"))
    adapter, unmerged = _lora_folder(folder, tmp_path / "lora", torch.float32)
    stored = torch.load(adapter / "non_lora_trainables.bin", weights_only=True)
    key = next(k for k in stored if k.endswith("mm_projector.0.bias"))
    wrapped = dict(stored)
    wrapped[key.replace("mm_projector.0.bias", "mm_projector.0.base_layer.bias")] = \
        wrapped.pop(key)
    torch.save(wrapped, adapter / "non_lora_trainables.bin")
    config = json.loads((adapter / "config.json").read_text())
    config["quantization_config"] = {"load_in_4bit": True, "quant_method": "bitsandbytes",
                                     "bnb_4bit_quant_type": "nf4"}
    (adapter / "config.json").write_text(json.dumps(config))
    loaded = _load(adapter, folder, dtype="float32")
    torch.testing.assert_close(probe_logits(loaded.model, loaded.image_processor),
                               probe_logits(unmerged, loaded.image_processor),
                               **tolerance("loader.lora_merge.float32").close_kwargs())


# --- LLaVA-1.6 (NeXT): anyres multi-crop images ----------------------------------------------
# The oracle suite matches these models bit for bit against LLaVA's own code; here: every
# variant loads and runs through every entry point, the token counts follow from the grid, the
# stored tower is the one that runs, and what cannot work fails in one clear line.

NEXT_VARIANTS = [(arch, aspect, merge) for arch in ARCHES for aspect in ("anyres", "pad")
                 for merge in ("flat", "spatial", "spatial_unpad")]
# (width, height) -> the tiny pinpoint LLaVA picks, the grid (columns, rows) and the feature
# rows/columns the unpad keeps (2x2 patches per crop), worked out by hand from LLaVA's rules.
NEXT_IMAGES = {(80, 20): ((3, 1), (2, 6)), (20, 15): ((1, 2), (2, 2)),
               (60, 40): ((2, 2), (2, 4)), (40, 60): ((2, 2), (4, 2))}


def _next_tokens(size, aspect: str, merge: str, as_list: bool = False) -> int:
    """How many features one image becomes, from the hand-worked table above. 'pad' images
    stack into one [N, 3, H, W] batch, which LLaVA encodes without any merge; passed as a
    list, each is one crop, and `*unpad*` ends it with an image_newline."""
    (columns, rows), (kept_h, kept_w) = NEXT_IMAGES[size]
    if aspect == "pad":
        return 4 + (as_list and "unpad" in merge)
    if merge in ("flat", "spatial"):
        return (1 + columns * rows) * 4
    return 4 + kept_h * (kept_w + 1)


@pytest.mark.parametrize("arch, aspect, merge", NEXT_VARIANTS,
                         ids=["-".join(v) for v in NEXT_VARIANTS])
def test_every_llava_next_variant_loads_and_runs(tiny_checkpoint_factory, capsys, arch, aspect,
                                                 merge):
    folder = tiny_checkpoint_factory("tiny-next", model={
        "arch": arch, "dtype": "float32", "image_aspect_ratio": aspect,
        "mm_patch_merge_type": merge, **({"num_key_value_heads": 2} if arch == "mistral"
                                         else {})})
    loaded = _load(folder, dtype="float32")
    model = loaded.model
    images = [probe_image(w, h, salt=i) for i, (w, h) in enumerate(NEXT_IMAGES)]
    ids = torch.tensor([[1, 7] + [t for _ in images for t in (IMAGE_TOKEN_INDEX, 11)]])
    pixels = process_images(images, loaded.image_processor, model.config)
    with torch.no_grad():
        logits = model(ids, images=pixels, image_sizes=[im.size for im in images]).logits
    expected = 2 + len(images) + sum(_next_tokens(im.size, aspect, merge) for im in images)
    assert logits.shape == (1, expected, model.config.vocab_size)
    assert bool(torch.isfinite(logits).all())
    if aspect == "pad":
        with torch.no_grad():
            listed = model(ids, images=list(pixels), image_sizes=[im.size for im in images])
        assert listed.logits.shape[1] == 2 + len(images) + sum(
            _next_tokens(im.size, aspect, merge, as_list=True) for im in images)
    assert torch.isfinite(probe_logits(model, loaded.image_processor, images=2)).all()
    assert any("stored in the checkpoint" in note for note in loaded.notes)
    assert cli_main(["load", str(folder), "--device", "cpu", "--dtype", "float32",
                     "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["architecture"] == arch and facts["kind"] == "llava"


# The same images: the feature rows and columns the unpad keeps, [start, stop), worked by hand.
NEXT_KEPT = {(80, 20): ((0, 2), (0, 6)), (20, 15): ((1, 3), (0, 2)),
             (60, 40): ((1, 3), (0, 4)), (40, 60): ((0, 4), (1, 3))}


def _hand_merge(crops: torch.Tensor, size, newline: torch.Tensor | None) -> torch.Tensor:
    """One anyres image's features laid out by hand, feature by feature: the base crop's,
    then each kept grid row left to right (feature (y, x) is patch (y % 2, x % 2) of crop
    (y // 2, x // 2), crops counted row by row), each row ended by the newline."""
    (columns, _rows), _ = NEXT_IMAGES[size]
    (top, bottom), (left, right) = NEXT_KEPT[size]
    out = list(crops[0])
    for y in range(top, bottom):
        for x in range(left, right):
            out.append(crops[1 + (y // 2) * columns + x // 2][(y % 2) * 2 + x % 2])
        if newline is not None:
            out.append(newline)
    return torch.stack(out)


@pytest.mark.parametrize("merge", ["spatial_unpad", "spatial"])
def test_anyres_layout_equals_a_hand_layout(tiny_checkpoint_factory, merge):
    """Independent of the oracle: the harness's grid layout, unpad and newline rows against a
    feature-by-feature layout (bit for bit: it only moves features); and the comparison sees
    a transposed crop order."""
    folder = tiny_checkpoint_factory("tiny-next", model={"dtype": "float32",
                                                         "mm_patch_merge_type": merge})
    loaded = _load(folder, dtype="float32")
    model = loaded.model
    images = [probe_image(w, h, salt=i) for i, (w, h) in enumerate(NEXT_IMAGES)]
    pixels = process_images(images, loaded.image_processor, model.config)
    newline = model.get_model().image_newline if merge == "spatial_unpad" else None
    with torch.no_grad():
        ours = model.image_features(pixels, [im.size for im in images])
        for image, crops, merged in zip(images, pixels, ours):
            features = model.encode_images(crops)
            if newline is None:  # 'spatial' keeps the whole grid: the unpad is not applied
                size = image.size
                (columns, rows), _ = NEXT_IMAGES[size]
                grid = [(y, x) for y in range(2 * rows) for x in range(2 * columns)]
                want = torch.stack(list(features[0]) + [
                    features[1 + (y // 2) * columns + x // 2][(y % 2) * 2 + x % 2]
                    for y, x in grid])
            else:
                want = _hand_merge(features, image.size, newline)
            assert torch.equal(merged, want), image.size
            transposed = features.clone()
            transposed[1:] = features[1:].flip(0)
            if transposed[1:].shape[0] > 1 and newline is not None:
                assert not torch.equal(merged, _hand_merge(transposed, image.size, newline))


def _stored_tower_features(folder: Path, unfreeze: bool, tmp_path: Path) -> tuple:
    """(features with the checkpoint loaded, features of the tower folder's CLIP alone)."""
    from transformers import CLIPVisionModel

    copy = tmp_path / f"unfreeze-{unfreeze}"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(unfreeze_mm_vision_tower=unfreeze, mm_vision_tower=str(copy / "vision_tower"))
    (copy / "config.json").write_text(json.dumps(config))
    loaded = _load(copy, dtype="float32", vision_tower_dtype="float32")
    pixels = process_images([probe_image()], loaded.image_processor, loaded.model.config)
    clip = CLIPVisionModel.from_pretrained(copy / "vision_tower",
                                           attn_implementation=ORIGINAL_CLIP_ATTENTION).eval()
    with torch.no_grad():
        ours = loaded.model.get_vision_tower()(pixels[0])
        folder_only = clip(pixels[0], output_hidden_states=True).hidden_states[-2][:, 1:]
    return ours, folder_only


def test_the_stored_tower_runs_when_unfreeze_is_set(tiny_checkpoint_factory, tmp_path):
    """LLaVA-1.6 stores its tuned tower in the checkpoint and sets unfreeze_mm_vision_tower:
    the original builds the tower at init, so the stored tensors load over the folder's. The
    builder writes a stored tower that differs from the folder's in every tensor."""
    folder = tiny_checkpoint_factory("tiny-next", model={"dtype": "float32"})
    stored, folder_only = _stored_tower_features(folder, True, tmp_path)
    assert not torch.equal(stored, folder_only)
    ignored, folder_only = _stored_tower_features(folder, False, tmp_path)
    assert torch.equal(ignored, folder_only)


def test_projector_only_over_a_llava_next_base_is_bit_identical(tiny_checkpoint_factory,
                                                               tmp_path):
    """The projector-only path over a v1.6 base: the base's stored tower, its image_newline."""
    folder = tiny_checkpoint_factory("tiny-next", model={"dtype": "float32"})
    full = _load(folder, dtype="float32")
    loaded = _load(_projector_folder(folder, tmp_path / "stage1"), folder, dtype="float32")
    assert loaded.kind == "projector"
    assert torch.equal(probe_logits(loaded.model, loaded.image_processor, images=2),
                       probe_logits(full.model, full.image_processor, images=2))


def _edited(folder: Path, out: Path, **config) -> Path:
    shutil.copytree(folder, out)
    data = json.loads((out / "config.json").read_text())
    data.update(config)
    (out / "config.json").write_text(json.dumps(data))
    return out


def test_a_stored_tower_that_does_not_fit_is_one_clear_line(tiny_checkpoint_factory, tmp_path,
                                                           capsys):
    from safetensors.torch import load_file, save_file

    folder = tiny_checkpoint_factory("tiny-next", model={"dtype": "float32"},
                                     checkpoint={"shards": 1})
    prefix = "model.vision_tower.vision_tower.vision_model."
    for name, edit, fragment in (
            ("lacking", lambda s: s.pop(prefix + "post_layernorm.bias"),
             "stores a vision tower without " + prefix + "post_layernorm.bias"),
            ("unknown", lambda s: s.update({prefix + "extra.weight": torch.ones(2)}),
             prefix + "extra.weight is no tensor of the vision tower"),
            ("shape", lambda s: s.update({prefix + "post_layernorm.bias": torch.ones(3)}),
             "has shape (3,), the tower expects (32,)")):
        broken = _edited(folder, tmp_path / name, mm_vision_tower=str(tmp_path / name /
                                                                       "vision_tower"))
        state = load_file(broken / "model.safetensors")
        edit(state)
        save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
        _one_line_error(_cli_load(capsys, broken, "--dtype", "float32"), str(broken), fragment)


def test_anyres_misuse_is_a_clear_error(tiny_checkpoint_factory, tmp_path):
    from harness.errors import HarnessError

    folder = tiny_checkpoint_factory("tiny-next", model={"dtype": "float32"})
    loaded = _load(folder, dtype="float32")
    model, image = loaded.model, probe_image(80, 20)
    pixels = process_images([image], loaded.image_processor, model.config)
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 5]])
    with pytest.raises(HarnessError, match="anyres images need their sizes"):
        model(ids, images=pixels)
    with pytest.raises(HarnessError, match=r"cut into 3x1 crops .* but 2 crops were given"):
        model(ids, images=[pixels[0][:3]], image_sizes=[image.size])
    for bad in ("[[28, 56], [56]]", [[0, 28]], "not a list"):
        model.config.image_grid_pinpoints = bad
        with pytest.raises(HarnessError, match="image_grid_pinpoints"):
            process_images([image], loaded.image_processor, model.config)


def test_llava_next_generate_passes_image_sizes(tiny_checkpoint_factory):
    """generate() splices once with the image sizes: its first greedy token is the forward
    pass's argmax, and without sizes it fails as clearly as forward does."""
    from harness.errors import HarnessError

    folder = tiny_checkpoint_factory("tiny-next", model={"dtype": "float32"})
    loaded = _load(folder, dtype="float32")
    model, images = loaded.model, [probe_image(80, 20), probe_image(20, 15, salt=1)]
    pixels = process_images(images, loaded.image_processor, model.config)
    ids = torch.tensor([[1, 5, IMAGE_TOKEN_INDEX, 7, IMAGE_TOKEN_INDEX, 9]])
    sizes = [im.size for im in images]
    with torch.no_grad():
        out = model.generate(ids, images=pixels, image_sizes=sizes, max_new_tokens=3,
                             do_sample=False)
        logits = model(ids, images=pixels, image_sizes=sizes).logits
    assert out.shape == (1, 3) and int(out[0, 0]) == int(logits[0, -1].argmax())
    with pytest.raises(HarnessError, match="image_sizes"):
        model.generate(ids, images=pixels, max_new_tokens=1, do_sample=False)

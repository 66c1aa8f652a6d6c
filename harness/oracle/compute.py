"""Runs inside the oracle environment: LLaVA's released code computes the oracle's tensors.

Started by `harness.oracle.live` as `<oracle venv>/bin/python -I compute.py PLAN.json`. It
imports LLaVA (the `llava-torch` wheel) under transformers 4.37 and never the harness, whose
dependencies it does not have: the plan file carries everything it needs (checkpoint folders,
cases, inputs, image files). It writes `cases/<id>.safetensors`, `images.safetensors` and
`computed.json` (case records, failures, versions) into the plan's `out` folder.
"""

from __future__ import annotations

import copy
import importlib.metadata as md
import json
import platform
import shutil
import sys
import traceback
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file

VERSIONS = ("llava-torch", "torch", "transformers", "tokenizers", "sentencepiece", "accelerate",
            "peft", "safetensors", "pillow", "numpy", "huggingface_hub", "protobuf")


class Recorder:
    """Collects one file's tensors and their manifest entries."""

    def __init__(self, relpath: str):
        self.relpath, self.tensors, self.entries = relpath, {}, {}

    def add(self, name: str, tensor, what: str) -> None:
        tensor = tensor.detach().contiguous()
        self.tensors[name] = tensor
        self.entries[name] = {"dtype": str(tensor.dtype).removeprefix("torch."),
                              "shape": list(tensor.shape), "what": what}

    def save(self, out: Path) -> dict:
        path = out / self.relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(self.tensors, str(path), metadata={"generator": "harness.oracle.compute"})
        path.chmod(0o644)  # safetensors creates files 0600
        return {"file": self.relpath, "tensors": self.entries}


def model_class(arch: str):
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM  # optional: llava
    from llava.model.language_model.llava_mistral import LlavaMistralForCausalLM  # optional: llava

    return LlavaMistralForCausalLM if arch == "mistral" else LlavaLlamaForCausalLM


def load_full(folder: Path, arch: str, dtype):
    """LLaVA's classes as its eval scripts use them, but in the case dtype instead of fp16."""
    model = model_class(arch).from_pretrained(str(folder), torch_dtype=dtype)
    tower = model.get_vision_tower()
    tower.load_model()
    tower.to(dtype=dtype)
    return model.eval()


def observed_logits(rec: Recorder, model) -> dict:
    """transformers 4.37's Llama/Mistral `forward` returns `logits.float()` whatever the model
    dtype: record that, and that the values are still exactly those of the model dtype."""
    logits = [t for name, t in rec.tensors.items() if name.startswith("logits.")]
    return {"logits_dtype": str(logits[0].dtype).removeprefix("torch."),
            "logits_exact_in_model_dtype": all(
                bool((t.to(model.dtype).to(t.dtype) == t).all()) for t in logits)}


def observed_dtypes(model) -> dict:
    tower = model.get_vision_tower()
    projector = next(model.get_model().mm_projector.parameters(), None)
    return {"model_dtype": str(model.dtype).removeprefix("torch."),
            "vision_tower_dtype": str(tower.dtype).removeprefix("torch."),
            "projector_dtype": None if projector is None
            else str(projector.dtype).removeprefix("torch."),
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            # transformers 4.37's CLIPAttention: eager only, q scaled before q@k^T, softmax in
            # the tower's dtype.
            "vision_attn_implementation": getattr(tower.vision_tower.config,
                                                  "_attn_implementation", None)}


class Oracle:
    def __init__(self, plan: dict):
        self.plan = plan
        self.out = Path(plan["out"])
        self.folders = {k: Path(v) for k, v in plan["checkpoints"].items()}
        self.images = {name: Image.open(path).convert("RGB")
                       for name, path in plan["images"].items()}
        self.pixels = {}  # (aspect, names) -> float32 tensor, checked equal across cases
        self.records, self.failures = [], []

    def pixels_of(self, model, names: tuple, aspect):
        """llava.mm_utils.process_images with the checkpoint's processor; aspect None = no pad."""
        from llava.mm_utils import process_images  # optional: llava

        config = copy.copy(model.config)
        config.image_aspect_ratio = aspect
        processor = model.get_vision_tower().image_processor
        got = process_images([self.images[n] for n in names], processor, config)
        key = (aspect or "none", names)
        if key in self.pixels and not torch.equal(self.pixels[key], got):
            raise RuntimeError(f"process_images {key} differs between checkpoints")
        self.pixels[key] = got
        return got

    def logits(self, model, input_name: str, pixels, image_dtype):
        ids = torch.tensor([self.plan["inputs"][input_name]["input_ids"]], dtype=torch.long)
        images = None if pixels is None else pixels.to(image_dtype)
        with torch.no_grad():
            return model(input_ids=ids, images=images).logits

    def run_inputs(self, rec: Recorder, model, image_dtype, aspect="pad") -> None:
        for name, spec in self.plan["inputs"].items():
            names = tuple(spec["images"])
            pixels = self.pixels_of(model, names, aspect) if names else None
            images = (f"pixels.{aspect}.{''.join(names)}.to({image_dtype})" if names
                      else "None")
            rec.add(f"logits.{name}", self.logits(model, name, pixels, image_dtype),
                    f"model(input_ids=inputs.{name}, images={images}).logits")

    def full_case(self, case: dict) -> None:
        dtype = getattr(torch, case["model"]["dtype"])
        arch = case["model"].get("arch", "llama")
        model = load_full(self.folders[case["id"]], arch, dtype)
        rec = Recorder(f"cases/{case['id']}.safetensors")
        self.run_inputs(rec, model, dtype)
        pixels = self.pixels_of(model, ("A",), "pad").to(dtype)
        with torch.no_grad():
            rec.add("vision_features.A", model.get_vision_tower()(pixels),
                    "model.get_vision_tower()(pixels.pad.A.to(dtype)): hidden_states[-2], "
                    "CLS dropped")
            rec.add("image_features.A", model.encode_images(pixels),
                    "model.encode_images(pixels.pad.A.to(dtype)): projector output")
        if case["id"] == self.plan["main_case"]:
            square = self.pixels_of(model, ("A",), None)
            rec.add("logits.one_image.square", self.logits(model, "one_image", square, dtype),
                    "as logits.one_image but images=pixels.none.A (image_aspect_ratio unset: "
                    "plain CLIP resize + center crop, no pad)")
        self.records.append({
            "id": case["id"], "path": "full", "checkpoint": case["id"],
            "loader": f"{model_class(arch).__name__}.from_pretrained(folder, torch_dtype="
                      f"torch.{case['model']['dtype']}); get_vision_tower().load_model(); "
                      "get_vision_tower().to(dtype=torch_dtype)",
            "observed": {**observed_dtypes(model), **observed_logits(rec, model)},
            **rec.save(self.out)})

    def anyres_pixels(self, model, name: str):
        """process_images of one image with the checkpoint's config (anyres: [crops, 3, H, W]),
        recorded once per aspect and checked equal across cases."""
        from llava.mm_utils import process_images  # optional: llava

        processor = model.get_vision_tower().image_processor
        got = process_images([self.images[name]], processor, model.config)[0]
        key = (model.config.image_aspect_ratio, (name,))
        if key in self.pixels and not torch.equal(self.pixels[key], got):
            raise RuntimeError(f"process_images {key} differs between checkpoints")
        self.pixels[key] = got
        return got

    def run_next_inputs(self, rec: Recorder, model, dtype) -> None:
        """Every anyres input: logits, and the embeddings `prepare_inputs_labels_for_multimodal`
        splices (where the crops were laid out)."""
        for name, spec in self.plan["next_inputs"].items():
            ids = torch.tensor(spec["input_ids"], dtype=torch.long)
            mask = (torch.tensor(spec["attention_mask"], dtype=torch.bool)
                    if "attention_mask" in spec else None)
            images, sizes = None, None
            if spec["images"]:
                images = [self.anyres_pixels(model, n).to(dtype) for n in spec["images"]]
                sizes = [self.images[n].size for n in spec["images"]]  # PIL: (width, height)
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask, images=images,
                               image_sizes=sizes).logits
                embeds = model.prepare_inputs_labels_for_multimodal(
                    ids, None, mask, None, None, images, sizes)[4]
            call = (f"images=[pixels.{model.config.image_aspect_ratio}.<name>.to(dtype) for "
                    f"name in {spec['images']}], image_sizes=[PIL size of each]"
                    if images else "images=None")
            rec.add(f"logits.{name}", logits,
                    f"model(input_ids=next_inputs.{name}, attention_mask=..., {call}).logits")
            if embeds is not None:
                rec.add(f"embeds.{name}", embeds,
                        f"prepare_inputs_labels_for_multimodal(..., {call})[4]: inputs_embeds")

    def next_case(self, case: dict) -> None:
        """A LLaVA-1.6 checkpoint, loaded as `full_case` does, on every anyres input."""
        dtype = getattr(torch, case["model"]["dtype"])
        arch = case["model"].get("arch", "llama")
        model = load_full(self.folders[case["id"]], arch, dtype)
        rec = Recorder(f"cases/{case['id']}.safetensors")
        self.run_next_inputs(rec, model, dtype)
        self.records.append({
            "id": case["id"], "path": "next", "checkpoint": case["id"],
            "loader": f"{model_class(arch).__name__}.from_pretrained(folder, torch_dtype="
                      f"torch.{case['model']['dtype']}); get_vision_tower().load_model(); "
                      "get_vision_tower().to(dtype=torch_dtype)",
            "observed": {**observed_dtypes(model), **observed_logits(rec, model),
                         "unfreeze_mm_vision_tower": bool(getattr(
                             model.config, "unfreeze_mm_vision_tower", False))},
            **rec.save(self.out)})

    def lpm_case(self, case_id: str, source: str, model_path: Path, model_path_is: str,
                 base: str | None, name: str, arch: str, note: str,
                 inputs: str = "inputs") -> None:
        from llava.model.builder import load_pretrained_model  # optional: llava

        base_path = None if base is None else str(self.folders[base])
        _, model, _, context_len = load_pretrained_model(str(model_path), base_path, name,
                                                         device="cpu")
        model.eval()
        rec = Recorder(f"cases/{case_id}.safetensors")
        # run_llava.py / model_vqa.py pass images as `.to(model.device, dtype=torch.float16)`.
        if inputs == "next_inputs":
            self.run_next_inputs(rec, model, model.dtype)
        else:
            self.run_inputs(rec, model, model.dtype)
        self.records.append({
            "id": case_id, "path": "load_pretrained_model", "inputs": inputs,
            "checkpoint": source,
            "model_path_is": model_path_is, "model_base": base,
            "loader": f"load_pretrained_model({model_path.name!r} folder, "
                      f"{'None' if base is None else repr(base) + ' folder'}, {name!r}, "
                      "device='cpu')",
            "model_name": name, "arch": arch, "context_len": context_len, "note": note,
            "observed": {**observed_dtypes(model), **observed_logits(rec, model)},
            **rec.save(self.out)})

    def try_lpm(self, **kwargs) -> None:
        default_dtype = torch.get_default_dtype()
        try:
            self.lpm_case(**kwargs)
        except Exception as exc:  # noqa: BLE001 - the oracle records the original's failures
            last = traceback.extract_tb(exc.__traceback__)[-1]
            self.failures.append({
                "id": kwargs["case_id"], "error": f"{type(exc).__name__}: {exc}",
                "raised_at": f"{Path(last.filename).name}:{last.lineno}", "note": kwargs["note"],
                # transformers 4.37 sets the default dtype to torch_dtype while it builds the
                # model and does not restore it when the build raises.
                "default_dtype_after": str(torch.get_default_dtype())})
        finally:
            torch.set_default_dtype(default_dtype)


PROJECTOR_FOLDER = {
    config: "a folder holding mm_projector.bin = torch.save({k: v for k, v in "
            "model.named_parameters() if 'mm_projector' in k}) of the checkpoint's model loaded "
            "in float32 (keys model.mm_projector.<i>.weight/.bias, float32), and config.json = "
            + ("a copy of the checkpoint's config.json (model_type 'llava')" if config == "builder"
               else "LLaVA's model.config.save_pretrained() (model_type 'llava_llama', "
                    "attention_bias/attention_dropout added)")
    for config in ("builder", "llava")}


def make_projector_folder(scratch: Path, source: Path, config_from: str) -> Path:
    """A stage-1 output folder as LLaVA's trainer writes it: mm_projector.bin holds the
    `mm_projector` entries of `model.named_parameters()` (keys `model.mm_projector.*`), beside a
    config.json. `config_from`: 'builder' = the source checkpoint's config.json (model_type
    'llava', as published); 'llava' = LLaVA's own `model.config.save_pretrained`."""
    folder = scratch / f"projector-config-{config_from}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    model = load_full(source, "llama", torch.float32)
    weights = {k: v.detach().clone() for k, v in model.named_parameters() if "mm_projector" in k}
    torch.save(weights, folder / "mm_projector.bin")
    if config_from == "builder":
        shutil.copy(source / "config.json", folder / "config.json")
    else:
        model.config.save_pretrained(str(folder))
    return folder


def legacy_tokenizer_copy(scratch: Path, source: Path) -> Path:
    """A copy of `source` whose tokenizer.json stores BPE merges as 'left right' strings.

    LLaVA's Mistral path loads the fast tokenizer; tokenizers 0.15 (pinned by transformers
    4.37.2) only reads that older merges format."""
    folder = scratch / f"{source.name}-legacy-tokenizer-json"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(source, folder)
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["model"]["merges"] = [m if isinstance(m, str) else " ".join(m)
                               for m in data["model"]["merges"]]
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return folder


def lpm_cases(oracle: Oracle, scratch: Path) -> None:
    main = oracle.plan["main_case"]
    oracle.try_lpm(case_id="lpm-full-llama", source=main, model_path=oracle.folders[main],
                   model_path_is="the checkpoint folder", base=None, name="llava-tiny",
                   arch="llama",
                   note="full LLaVA model through the original loader (forces float16)")
    mistral = oracle.plan["mistral_lpm_source"]
    oracle.try_lpm(
        case_id="lpm-full-mistral", source=mistral,
        model_path=legacy_tokenizer_copy(scratch, oracle.folders[mistral]), base=None,
        model_path_is="a copy of the checkpoint folder, tokenizer.json merges rewritten",
        name="llava-mistral-tiny", arch="mistral",
        note="full LLaVA-Mistral model through the original loader (forces float16); run on a "
             "copy whose tokenizer.json merges are rewritten as 'a b' strings, since "
             "tokenizers 0.15 cannot read the pair-list merges the builder writes (weights "
             "untouched; the tokenizer plays no part in the logits)")
    next_mistral = oracle.plan["next_lpm_source"]
    oracle.try_lpm(
        case_id="lpm-next-mistral", source=next_mistral,
        model_path=legacy_tokenizer_copy(scratch, oracle.folders[next_mistral]), base=None,
        model_path_is="a copy of the checkpoint folder, tokenizer.json merges rewritten",
        name="llava-v1.6-mistral-tiny", arch="mistral", inputs="next_inputs",
        note="LLaVA-1.6 (anyres, spatial_unpad, tuned tower stored in the checkpoint) through "
             "the original loader (forces float16), on the anyres inputs; tokenizer copy as "
             "for lpm-full-mistral")
    base = oracle.plan["bases"][0]["id"]
    for config_from in ("builder", "llava"):
        folder = make_projector_folder(scratch, oracle.folders[main], config_from)
        for base_id, what in ((base, "seed-1 base"), (main, "same-checkpoint base")):
            suffix = "seed1-base" if base_id == base else "same-base"
            oracle.try_lpm(
                case_id=f"lpm-projector-config_{config_from}-{suffix}", source=main,
                model_path=folder, model_path_is=PROJECTOR_FOLDER[config_from], base=base_id,
                name="llava-tiny-pretrain", arch="llama",
                note=f"projector-only: mm_projector.bin of {main} (float32, cast to float16 by "
                     f"the loader) over the {what}; config.json from {config_from}. The vision "
                     f"tower is the one the projector folder's config.json names ({main}'s), "
                     "not the base's")


def anyres_choices(plan: dict, images: dict) -> dict:
    """LLaVA's own grid choice for every anyres image on the tiny pinpoints."""
    # optional: llava
    from llava.mm_utils import get_anyres_image_grid_shape, select_best_resolution

    pinpoints = plan["next_pinpoints"]
    return {name: {"size_wh": list(images[name].size),
                   "best_resolution_wh": list(select_best_resolution(images[name].size,
                                                                     pinpoints)),
                   "grid_wh": list(get_anyres_image_grid_shape(images[name].size, pinpoints,
                                                               plan["next_crop_side"]))}
            for name in plan["next_images"]}


def images_file(oracle: Oracle) -> dict:
    import numpy as np  # heavy: numpy

    rec = Recorder("images.safetensors")
    for name, image in oracle.images.items():
        rec.add(f"raw.{name}", torch.from_numpy(np.asarray(image).copy()),
                f"the PIL image {name} as uint8 [height, width, 3]")
    for (aspect, names), pixels in sorted(oracle.pixels.items()):
        one = "[0] (one image's crops)" if aspect == "anyres" else ""
        rec.add(f"pixels.{aspect}.{''.join(names)}", pixels,
                f"llava.mm_utils.process_images({list(names)}, processor, config with "
                f"image_aspect_ratio={aspect if aspect != 'none' else None!r}){one}")
    return rec.save(oracle.out)


def environment() -> dict:
    versions = {}
    for name in VERSIONS:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return {"python": platform.python_version(), "platform": platform.platform(),
            "torch_num_threads": torch.get_num_threads(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), **versions}


def main(plan_path: str) -> int:
    plan = json.loads(Path(plan_path).read_text())
    torch.manual_seed(0)  # nothing should draw; pinned so a stray init can't vary run to run
    oracle = Oracle(plan)
    shutil.rmtree(oracle.out / "cases", ignore_errors=True)
    scratch = Path(plan["scratch"])
    for case in plan["cases"]:
        oracle.full_case(case)
    lpm_cases(oracle, scratch)
    for case in plan["next_cases"]:
        oracle.next_case(case)
    computed = {"environment": environment(), "images": images_file(oracle),
                "anyres_choices": anyres_choices(plan, oracle.images),
                "cases": oracle.records, "failures": oracle.failures}
    (oracle.out / "computed.json").write_text(json.dumps(computed, indent=2) + "\n")
    print(f"{len(oracle.records)} cases, {len(oracle.failures)} failures of the original code")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

"""A checkpoint folder validated without loading the whole model: index consistency, config,
projector type and parameter counts against the config, language-model shapes against
transformers' own classes (a pre-quantized folder's logical shapes, every quantized linear's
stored tensors checked first), projector extraction and backbone stripping. Runs on
`--llava-checkpoint DIR` (your folder, original LLaVA or llava-hf layout) or, without it, on the
tiny synthetic default; a check that needs what the folder lacks skips and says what. Every
rule of `llava-harness check` runs beside it (test_folder_rules.py)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from harness.checkpoint.quantized import logical_shapes, quantized_linears, scheme_of
from harness.checkpoint.reader import CheckpointError, consistency_problems, open_folder
from harness.errors import HarnessError
from harness.model.backbone import is_language_model_key, language_model_config
from harness.llava.config import (is_hf_layout, is_llava_config, lm_fields, missing_fields,
                                  mm_hidden_size_of, projector_type_of, read_config)
from harness.llava.errors import ContractError
from harness.llava.keys import LAYOUT_MAPS, PROJECTOR_PREFIX
from harness.llava.projector import projector_type_from_shapes
from harness.llava.tensors import canonical_shapes
from harness.model.projector import build_projector
from harness.ops.counts import count_checkpoint
from harness.ops.extract import extract
from harness.ops.strip import parameter_count, strict_problems, strip

# Loading the language model for a forward pass is only done below this size: the point of
# this suite is to validate a real-size folder without holding it in memory.
LOAD_AT_MOST_BYTES = 2 * 2**30
# Inputs are hashed before and after the operations when this small; above it, size and
# modification time stand in (hashing 13.5 GB twice would dominate the run).
HASH_AT_MOST_BYTES = 256 * 2**20


@pytest.fixture(scope="module")
def folder(llava_checkpoint) -> Path:
    return Path(llava_checkpoint)


@pytest.fixture(scope="module")
def ckpt(folder):
    try:
        return open_folder(folder)
    except CheckpointError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="module")
def tensors(ckpt):
    try:
        return ckpt.tensors
    except CheckpointError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="module")
def scheme(config, folder):
    """The folder's quantization scheme (config.json's quantization_config), or None."""
    try:
        return scheme_of(config, folder / "config.json")
    except CheckpointError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="module")
def logical(tensors, scheme, folder, config) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape as the unquantized model stores it (a quantized linear's stored
    tensors, all present and consistent, become its float weight), under its original-layout
    name (a llava-hf folder's names mapped)."""
    shapes = {k: t.shape for k, t in tensors.items()}
    try:
        if scheme is not None:
            shapes = logical_shapes(tensors, quantized_linears(scheme, tensors, folder))
        return canonical_shapes(shapes, config)
    except (CheckpointError, ContractError) as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="module")
def config(folder) -> dict:
    """config.json through the contract: every field held to its schema."""
    if not (folder / "config.json").is_file():
        pytest.skip(f"{folder / 'config.json'}: no config.json, so nothing to check shapes and "
                    "types against")
    try:
        return read_config(folder)
    except (CheckpointError, ContractError) as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="module")
def llava_config(config, folder) -> dict:
    if not is_llava_config(config):
        pytest.skip(f"{folder / 'config.json'}: no mm_vision_tower and no LLaVA architecture; "
                    "a plain language model folder, so the projector checks do not apply")
    return config


@pytest.fixture(scope="module")
def projector_shapes(logical) -> dict[str, tuple[int, ...]]:
    return {k[len(PROJECTOR_PREFIX):]: tuple(shape) for k, shape in logical.items()
            if k.startswith(PROJECTOR_PREFIX)}


def snapshot(folder: Path) -> dict[str, tuple]:
    """Each file's size and mtime, plus its sha256 when the folder is small."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    small = sum(p.stat().st_size for p in files) <= HASH_AT_MOST_BYTES
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns,
                                         hashlib.sha256(p.read_bytes()).hexdigest()
                                         if small else None)
            for p in files}


@pytest.fixture(scope="module")
def rounds(ckpt) -> int:
    """Timed rounds of each operation: several on a small folder (its noise is measured),
    one on a real-size folder (a 7B strip takes tens of seconds)."""
    return 5 if sum(t.nbytes for t in ckpt.tensors.values()) <= HASH_AT_MOST_BYTES else 1


def test_index_matches_the_files(ckpt, llava_record, rounds):
    problems = llava_record.timed("index_check_wall_s", lambda: consistency_problems(ckpt),
                                  rounds)
    assert not problems, f"{len(problems)} problem(s): " + "; ".join(problems[:5])
    llava_record("tensors", len(ckpt.tensors), "count")
    llava_record("shards", len(ckpt.files), "count")
    llava_record("tensor_bytes", sum(t.nbytes for t in ckpt.tensors.values()), "B", "none")


def test_config_has_the_llava_fields(llava_config, folder):
    """What the loaders need of a full LLaVA config of its layout (the schema has already held
    every present field to its type and range)."""
    missing = missing_fields(llava_config)
    assert not missing, f"{folder / 'config.json'}: lacks {', '.join(missing)}"


def test_projector_type_agrees_with_the_config(llava_config, projector_shapes, folder):
    try:
        inferred = projector_type_from_shapes(projector_shapes)
    except ContractError as exc:
        pytest.fail(f"{folder}: {exc}", pytrace=False)
    declared = projector_type_of(llava_config) if is_hf_layout(llava_config) else \
        llava_config.get("mm_projector_type")
    if declared is None:
        # LLaVA's builder silently falls back to `linear` (its issues #550/#465).
        assert inferred == "linear", (
            f"{folder / 'config.json'}: no mm_projector_type, so LLaVA builds 'linear', but the "
            f"tensors are a {inferred} projector")
    else:
        assert inferred == declared, (f"{folder / 'config.json'}: mm_projector_type "
                                      f"{declared!r}, but the tensors are a {inferred} projector")


def test_projector_shapes_match_a_module_built_from_the_config(llava_config, projector_shapes,
                                                               folder, llava_record):
    kind = projector_type_of(llava_config)
    mm, hidden = mm_hidden_size_of(llava_config), lm_fields(llava_config).get("hidden_size")
    try:
        with torch.device("meta"):
            module = build_projector(kind, mm, hidden)
    except (ContractError, TypeError) as exc:
        pytest.fail(f"{folder / 'config.json'}: cannot build its projector ({exc})",
                    pytrace=False)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert projector_shapes == expected, (
        f"{folder}: projector tensors {projector_shapes} != what {kind} with mm_hidden_size "
        f"{mm} and hidden_size {hidden} builds: {expected}")
    llava_record("projector_params", sum(v.numel() for v in module.parameters()), "params")


def test_projector_count_formula_module_and_file_agree(llava_config, folder, llava_record):
    try:
        counts = count_checkpoint(folder)
    except CheckpointError as exc:
        pytest.fail(str(exc), pytrace=False)
    assert counts.agree, (f"{folder}: projector parameters disagree: formula {counts.formula:,}, "
                          f"module {counts.module:,}, file headers {counts.tensors:,}")
    llava_record("total_params", counts.total_params, "params")
    llava_record("trainable_params_stage1", counts.trainable_stage1, "params")


def test_language_model_shapes_match_transformers(llava_config, logical, folder, llava_record):
    lm_config = language_model_config(llava_config)
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(lm_config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: shape for k, shape in logical.items() if is_language_model_key(k)}
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    assert not missing and not extra, (f"{folder}: language model keys differ from "
                                       f"{type(model).__name__}: missing {missing[:3]}, "
                                       f"unexpected {extra[:3]}")
    wrong = [k for k in expected if expected[k] != found[k]]
    assert not wrong, (f"{folder}: {wrong[0]} has shape {found[wrong[0]]}, "
                       f"{type(model).__name__} expects {expected[wrong[0]]}")
    llava_record("language_model_params", sum(torch.Size(s).numel() for s in found.values()),
                 "params")


def test_language_model_loads_and_runs(ckpt, llava_config, folder, scheme):
    size = sum(t.nbytes for t in ckpt.tensors.values())
    if size > LOAD_AT_MOST_BYTES:
        pytest.skip(f"{size / 2**30:.1f} GiB: loading the whole model is what this suite "
                    f"avoids above {LOAD_AT_MOST_BYTES / 2**30:.0f} GiB")
    if scheme is not None and scheme.method != "bitsandbytes":
        pytest.skip(f"{folder}: {scheme.name} needs its own kernels to run (the harness "
                    "reads its layout; bitsandbytes layouts run on CPU)")
    if scheme is not None:
        # The quantization comes from the folder's config, through the LLaVA loader.
        from harness.ops.load import load

        model = load(folder, None, "llava-checkpoint", device="cpu", dtype=torch.float32).model
    else:
        from harness.model.backbone import load_language_model

        model = load_language_model(folder, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 2]])).logits
    assert logits.shape[-1] == lm_fields(llava_config)["vocab_size"]
    assert torch.isfinite(logits).all(), f"{folder}: non-finite logits"


def test_extraction_copies_the_projector_bit_for_bit(folder, ckpt, projector_shapes, tmp_path,
                                                     llava_record, rounds):
    if not projector_shapes:
        pytest.skip(f"{folder}: no {PROJECTOR_PREFIX}* tensors to extract")
    if is_hf_layout(read_config(folder)):
        pytest.skip(f"{folder}: a llava-hf folder; extraction is LLaVA's script's, for the "
                    "original layout (`llava-harness convert --to original` first)")
    before = snapshot(folder)
    result = llava_record.timed("extract_wall_s", lambda: extract(
        folder, tmp_path / "mm_projector.bin", force=True), rounds, warmup=0)
    llava_record("extract_files_read", len(result.files_read), "files", "lower")
    got = torch.load(result.output, map_location="cpu", weights_only=True)
    keys = [PROJECTOR_PREFIX + k for k in projector_shapes]
    source = ckpt.read(keys)
    assert sorted(got) == sorted(keys)
    for key in keys:
        assert got[key].dtype == source[key].dtype and torch.equal(got[key], source[key]), key
    assert snapshot(folder) == before, f"{folder}: extraction changed an input file"


def test_strip_gives_a_plain_language_model(folder, ckpt, llava_config, tmp_path, llava_record,
                                            rounds):
    need = sum(t.nbytes for t in ckpt.tensors.values())
    free = shutil.disk_usage(tmp_path).free
    if free < need * 1.1 + 2 * 2**30:  # and leave others some room on a shared disk
        pytest.skip(f"stripping needs ~{need / 2**30:.1f} GiB in {tmp_path}, "
                    f"{free / 2**30:.1f} GiB free")
    before = snapshot(folder)
    out = tmp_path / "stripped"
    try:
        _check_stripped(folder, out, llava_record, rounds)
    finally:
        shutil.rmtree(out, ignore_errors=True)  # a real-size copy must not outlive the test
    assert snapshot(folder) == before, f"{folder}: stripping changed an input file"


def _check_stripped(folder: Path, out: Path, llava_record, rounds: int) -> None:
    try:
        result = llava_record.timed("strip_wall_s", lambda: strip(folder, out, verify=False,
                                                                  force=True), rounds, warmup=0)
    except HarnessError as exc:
        pytest.fail(str(exc), pytrace=False)
    problems = strict_problems(out)
    assert not problems, f"{len(problems)} problem(s): " + "; ".join(problems[:3])
    assert consistency_problems(open_folder(out)) == []
    layout = LAYOUT_MAPS[result.layout]  # dropped keys are named in the source's layout
    assert not [k for k in result.dropped if layout(k) and is_language_model_key(layout(k))], \
        f"{folder}: stripping dropped language-model tensors"
    llava_record("stripped_params", parameter_count(out), "params")

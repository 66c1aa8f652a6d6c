"""A checkpoint's identity: its tensors' bytes and its configuration's meaning.

What a library stamps on every save (`transformers_version`, `_name_or_path`, absolute paths)
must never make two checkpoints differ, and every real difference must be found and named:
the file, the field or tensor, and for tensors on disk how far apart they are.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness.checkpoint.identity import (
    ABSOLUTE_PATH, CHANGED, EXTRA, MISSING, differences, folder_differences, folder_identity,
    meaning)
from harness.checkpoint.problems import CheckpointError
from harness.synth.builder import build
from harness.synth.presets import build_spec

TOWER_WEIGHTS = "vision_tower/model.safetensors"
SHARD = "pytorch_model-00002-of-00002.bin"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("identity") / "ckpt"
    build(build_spec("tiny"), folder)
    return folder


@pytest.fixture
def copy(built, tmp_path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(built, out)
    return out


def edit_json(path: Path, **fields) -> None:
    data = json.loads(path.read_text())
    data.update(fields)
    path.write_text(json.dumps(data, indent=4))  # another layout of the same JSON too


def lines(a: Path, b: Path) -> list[str]:
    return [str(d) for d in folder_differences(a, b)]


def test_what_a_save_stamps_is_not_identity(built, copy):
    """A new transformers release, another machine's paths, another writer's JSON layout."""
    edit_json(copy / "config.json", transformers_version="9.99.0", _name_or_path="/x/y",
              mm_vision_tower="/another/machine/vision_tower", _commit_hash="abc")
    edit_json(copy / "vision_tower/config.json", transformers_version="9.99.0")
    edit_json(copy / "generation_config.json", transformers_version="9.99.0")
    assert folder_differences(built, copy) == []


def test_stamps_are_removed_at_any_depth_and_paths_anywhere():
    data = {"text_config": {"_name_or_path": "lmsys/vicuna", "hidden_size": 4},
            "list": [{"transformers_version": "1"}, "/abs/path", "relative/path"]}
    assert meaning(data) == {"text_config": {"hidden_size": 4},
                             "list": [{}, ABSOLUTE_PATH, "relative/path"]}


def test_a_config_field_that_changes_meaning_is_named_with_both_values(built, copy):
    edit_json(copy / "vision_tower/config.json", hidden_size=31)
    edit_json(copy / "config.json", mm_vision_tower="openai/clip-vit-large-patch14-336")
    assert lines(built, copy) == [
        'config.json: field mm_vision_tower is "openai/clip-vit-large-patch14-336", recorded '
        f'"{ABSOLUTE_PATH}"',
        "vision_tower/config.json: field hidden_size is 31, recorded 32"]


def test_one_ulp_in_one_tensor_is_found_with_its_size_and_place(built, copy):
    tensors = load_file(copy / TOWER_WEIGHTS)
    key = "vision_model.post_layernorm.weight"
    bumped = tensors[key].clone()
    bumped[5] = torch.nextafter(bumped[5], torch.tensor(2.0))
    tensors[key] = bumped
    save_file(tensors, copy / TOWER_WEIGHTS, metadata={"format": "pt"})
    (diff,) = folder_differences(built, copy)
    assert (diff.file, diff.what, diff.name, diff.change) == (TOWER_WEIGHTS, "tensor", key,
                                                               CHANGED)
    ulp = float(bumped[5] - load_file(built / TOWER_WEIGHTS)[key][5])
    assert str(diff) == (f"{TOWER_WEIGHTS}: tensor {key} differs: max |difference| "
                         f"{ulp:.6g} at [5], 1 of 32 elements differ")


def test_a_dtype_change_is_named(built, copy):
    tensors = load_file(copy / TOWER_WEIGHTS)
    key = "vision_model.post_layernorm.bias"
    tensors[key] = tensors[key].half()
    save_file(tensors, copy / TOWER_WEIGHTS, metadata={"format": "pt"})
    assert lines(built, copy) == [f"{TOWER_WEIGHTS}: tensor {key} is float16[32], recorded "
                                  "float32[32]"]


def test_the_layout_of_a_tensor_file_is_not_identity(built, copy):
    """Other record names (torch.save names records after the file), another header order,
    a shared storage: the same tensors are the same checkpoint."""
    state = torch.load(built / SHARD, weights_only=True)
    torch.save(dict(reversed(list(state.items()))), copy / "other-name.bin")
    (copy / SHARD).unlink()
    (copy / "other-name.bin").rename(copy / SHARD)
    assert (copy / SHARD).read_bytes() != (built / SHARD).read_bytes()
    tensors = load_file(built / TOWER_WEIGHTS)
    save_file(dict(sorted(tensors.items(), reverse=True)), copy / TOWER_WEIGHTS,
              metadata={"format": "pt"})
    assert folder_differences(built, copy) == []


def test_safetensors_metadata_is_identity(built, copy):
    """transformers refuses a safetensors file whose metadata `format` is not one it knows."""
    save_file(load_file(built / TOWER_WEIGHTS), copy / TOWER_WEIGHTS, metadata={"format": "np"})
    assert lines(built, copy) == [f'{TOWER_WEIGHTS}: metadata is {{"format":"np"}}, recorded '
                                  '{"format":"pt"}']


def test_files_and_tensors_missing_or_added_are_named(built, copy):
    (copy / "tokenizer.model").unlink()
    (copy / "added_tokens.json").write_text('{"<image>": 512}')
    tensors = load_file(copy / TOWER_WEIGHTS)
    tensors.pop("vision_model.post_layernorm.bias")
    tensors["extra"] = torch.zeros(2)
    save_file(tensors, copy / TOWER_WEIGHTS, metadata={"format": "pt"})
    found = differences(folder_identity(built), folder_identity(copy))
    assert [(d.file, d.name, d.change) for d in found] == [
        ("added_tokens.json", "", EXTRA),
        ("tokenizer.model", "", MISSING),
        (TOWER_WEIGHTS, "extra", EXTRA),
        (TOWER_WEIGHTS, "vision_model.post_layernorm.bias", MISSING)]


def test_other_bytes_are_compared_as_bytes(built, copy):
    raw = bytearray((copy / "tokenizer.model").read_bytes())
    raw[-1] ^= 1
    (copy / "tokenizer.model").write_bytes(bytes(raw))
    assert lines(built, copy) == ["tokenizer.model: bytes differ"]


def test_a_link_out_of_the_folder_is_refused(copy, tmp_path):
    (tmp_path / "secret.json").write_text("{}")
    (copy / "stolen.json").symlink_to(tmp_path / "secret.json")
    with pytest.raises(CheckpointError, match="stolen.json: is a symbolic link that leaves"):
        folder_identity(copy)


def test_an_unreadable_json_file_is_one_line(copy):
    (copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json: not readable JSON"):
        folder_identity(copy)


def test_the_builder_writes_the_same_bytes_whatever_transformers_is_installed(
        built, tmp_path, monkeypatch):
    """The builder's files never carry the installed library's version: a release of
    transformers must not change what a synthetic checkpoint is, to the byte."""
    import transformers
    import transformers.configuration_utils

    for module in (transformers, transformers.configuration_utils):  # what save_pretrained stamps
        monkeypatch.setattr(module, "__version__", "9.99.0")
    build(build_spec("tiny"), tmp_path / "again")
    names = sorted(str(p.relative_to(built)) for p in built.rglob("*") if p.is_file())
    for name in names:
        if name == "config.json":  # names its own tower folder by absolute path
            continue
        assert (tmp_path / "again" / name).read_bytes() == (built / name).read_bytes(), name
    assert "9.99" not in (tmp_path / "again" / "config.json").read_text()


def test_verify_compares_configs_by_meaning(built, copy):
    """`verify` holds a folder's configs to the spec's build: a stamp passes, a field that
    changes what the model is fails, named."""
    from harness.synth.verify import verify

    spec = build_spec("tiny")
    edit_json(copy / "config.json", transformers_version="9.99.0")
    assert verify(spec, copy) == []
    edit_json(copy / "config.json", rope_theta=500000.0)
    assert verify(spec, copy) == [f"{copy}/config.json: field rope_theta is 500000.0, "
                                  "recorded 10000.0 (the spec's build)"]

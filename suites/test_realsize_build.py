"""Real-size builds (run with --llava-realsize): the cached llava-v1.5-7b folders carry exactly the
published metadata, read from their headers without loading tensor data, and spot-checked
tensors regenerate from (seed, key). Each build is 13.5 GB; the cache keeps them across runs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from harness.checkpoint.reader import open_folder
from harness.synth.plan import make_plan
from harness.synth.presets import build_spec
from harness.synth.verify import layout_problems, matches_generated

REFERENCE = json.loads((Path(__file__).parents[1] / "fixtures/reference/llava-v1.5-7b.json")
                       .read_text())

pytestmark = [pytest.mark.realsize, pytest.mark.slow]


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_7b_folder_matches_the_published_metadata(realsize_checkpoint_factory, fmt):
    spec = build_spec("llava-v1.5-7b", checkpoint={"format": fmt})
    folder = realsize_checkpoint_factory("llava-v1.5-7b", checkpoint={"format": fmt})
    ckpt = open_folder(folder)
    assert layout_problems(spec, ckpt) == []
    assert ckpt.total_size == REFERENCE["total_size"]
    assert sum(m.nbytes for m in ckpt.tensors.values()) == REFERENCE["total_size"]
    assert len(ckpt.tensors) == REFERENCE["tensor_count"]
    config = json.loads((folder / "config.json").read_text())
    assert {k: config[k] for k in REFERENCE["config"]} == REFERENCE["config"]
    # Spot-check a few tensors' bytes (all 13.5 GB would take minutes to re-read).
    infos = random.Random(0).sample(make_plan(spec).tensors, 6)
    infos.append(next(t for t in make_plan(spec).tensors if t.key == "lm_head.weight"))
    loaded = ckpt.read([t.key for t in infos])
    for info in infos:
        assert matches_generated(spec, info, loaded[info.key]), info.key

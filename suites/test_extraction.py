"""Projector extraction: bit-exact against the source across format x sharding x placement x
index x projector type x dtype; lazy (shards without projector keys are never opened, and only
the projector's bytes are read); inputs never written; the output loads the way stage 2's
`--pretrain_mm_mlp_adapter` loads it; every bad input is one line, exit 2 and no output.

The source tensors are read through `harness.checkpoint.reader` (torch.load / safe_open), an
implementation independent of the torch-free extractor, so the comparison is a real oracle.
Checkpoints are built without tokenizer and vision tower (0.1 s instead of 3.5 s each): the
extractor never looks at either.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from harness.checkpoint.formats import INDEX_NAMES, SINGLE_NAMES
from harness.checkpoint.reader import open_folder
from harness.cli.app import main
from harness.model.projector import build_projector
from harness.ops.extract import extract, tensors_in
from harness.synth.builder import build
from harness.synth.presets import build_spec

TYPES = ("linear", "mlp2x_gelu", "mlp3x_gelu")
DTYPES = ("float32", "float16", "bfloat16")
OUT_SUFFIXES = (".bin", ".safetensors")
PROJ = "mm_projector"


@dataclass(frozen=True)
class Layout:
    format: str
    shards: int
    placement: str = "last"
    index: bool = True  # only meaningful for one shard: transformers writes none then

    @property
    def id(self) -> str:
        index = "" if self.shards > 1 else ("-index" if self.index else "-noindex")
        return f"{self.format}-{self.shards}sh-{self.placement}{index}"


PLACEMENTS_BY_SHARDS = {1: ("last",), 2: ("first", "last", "split"),
                        3: ("first", "middle", "last", "split")}
LAYOUTS = [Layout(fmt, n, place, index)
           for fmt in ("bin", "safetensors") for n, places in PLACEMENTS_BY_SHARDS.items()
           for place in places for index in ((True, False) if n == 1 else (True,))]


def bare_spec(model: dict | None = None, **checkpoint):
    return dataclasses.replace(build_spec("tiny", model=model, checkpoint=checkpoint),
                               with_tokenizer=False, with_vision_tower=False)


def write_single_index(folder: Path, fmt: str) -> None:
    """An index for a single-file checkpoint (some tools write one): every key -> that file."""
    keys = tensors_in(folder / SINGLE_NAMES[fmt], fmt)
    (folder / INDEX_NAMES[fmt]).write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: SINGLE_NAMES[fmt] for k in sorted(keys)}}))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """`built(layout, projector, dtype, **model)` -> a tiny checkpoint folder, built once."""
    root, cache = tmp_path_factory.mktemp("extract-src"), {}

    def get(layout: Layout, projector: str = "mlp2x_gelu", dtype: str = "float32",
            **model) -> Path:
        key = (layout, projector, dtype, tuple(sorted(model.items())))
        if key not in cache:
            spec = bare_spec({"projector_type": projector, "dtype": dtype, **model},
                             format=layout.format, shards=layout.shards,
                             placement=layout.placement)
            folder = root / f"c{len(cache)}-{layout.id}-{projector}-{dtype}"
            build(spec, folder)
            if layout.shards == 1 and layout.index:
                write_single_index(folder, layout.format)
            cache[key] = folder
        return cache[key]

    return get


def sha256_tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def source_projector(folder: Path, patterns=(PROJ,)) -> dict[str, torch.Tensor]:
    ckpt = open_folder(folder)
    return ckpt.read([k for k in ckpt.tensors if any(p in k for p in patterns)])


def projector_files(folder: Path) -> set[str]:
    ckpt = open_folder(folder)
    return {ckpt.file_of(k) for k in ckpt.tensors if PROJ in k}


def load_output(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def bit_differences(expected: dict, actual: dict) -> list[str]:
    """Every way two state dicts differ: keys, dtypes, shapes, any bit of any element."""
    problems = [f"missing {k}" for k in expected.keys() - actual.keys()]
    problems += [f"unexpected {k}" for k in actual.keys() - expected.keys()]
    for key in sorted(expected.keys() & actual.keys()):
        a, b = expected[key], actual[key]
        if a.dtype != b.dtype or a.shape != b.shape:
            problems.append(f"{key}: {a.dtype} {tuple(a.shape)} != {b.dtype} {tuple(b.shape)}")
        elif not torch.equal(_bytes(a), _bytes(b)):
            problems.append(f"{key}: bytes differ")
    return problems


def get_w(weights: dict, keyword: str) -> dict:
    """Stage 2's reduction in `initialize_vision_modules` (keys after `mm_projector.`)."""
    return {k.split(keyword + ".")[1]: v for k, v in weights.items() if keyword in k}


# --- the comparison itself must catch what it claims to -------------------------------------

def test_bit_comparison_catches_planted_defects():
    ref = {"a": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), "b": torch.ones(2)}
    flipped = ref["a"].clone()
    flipped.view(torch.int16)[1, 2] ^= 1  # one bit of one element
    assert bit_differences(ref, {k: v.clone() for k, v in ref.items()}) == []
    assert bit_differences(ref, {**ref, "a": flipped}) == ["a: bytes differ"]
    assert bit_differences(ref, {**ref, "a": ref["a"].float()})[0].startswith("a: torch.bfloat16")
    assert bit_differences(ref, {"a": ref["a"]}) == ["missing b"]
    assert bit_differences(ref, {**ref, "c": ref["b"]}) == ["unexpected c"]
    nan = torch.tensor([float("nan")])
    other_nan = nan.clone()
    other_nan.view(torch.int32)[0] ^= 1  # a different NaN payload: equal as values, not as bits
    assert bit_differences({"n": nan}, {"n": other_nan}) == ["n: bytes differ"]


# --- bit-exact across the layout matrix -----------------------------------------------------

@pytest.mark.parametrize("projector", TYPES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.id)
def test_extraction_is_bit_exact(built, tmp_path, layout, projector):
    # A Latin square over (layout, type) -> dtype: every pair of the three axes is covered.
    dtype = DTYPES[(LAYOUTS.index(layout) + TYPES.index(projector)) % len(DTYPES)]
    folder = built(layout, projector, dtype)
    before = sha256_tree(folder)
    expected = source_projector(folder)
    assert expected and all(str(t.dtype) == f"torch.{dtype}" for t in expected.values())
    for suffix in OUT_SUFFIXES:
        result = extract(folder, tmp_path / f"mm_projector{suffix}")
        assert bit_differences(expected, load_output(result.output)) == []
        assert set(result.files_read) == projector_files(folder)
    assert sha256_tree(folder) == before


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("projector", TYPES)
def test_every_type_and_dtype_on_a_split_projector(built, tmp_path, projector, dtype):
    folder = built(Layout("safetensors", 3, "split"), projector, dtype)
    assert len(projector_files(folder)) == 2
    for suffix in OUT_SUFFIXES:
        out = extract(folder, tmp_path / f"p{suffix}").output
        assert bit_differences(source_projector(folder), load_output(out)) == []


def _few(fn):
    """Few examples in the ci profile (each builds a checkpoint); the profile's own in dev."""
    if os.environ.get("HYPOTHESIS_PROFILE", "ci") == "ci":
        return settings(max_examples=6)(fn)
    return fn


@st.composite
def layouts(draw):
    n = draw(st.integers(1, 4))
    places = PLACEMENTS_BY_SHARDS[min(n, 3)]
    return (Layout(draw(st.sampled_from(("bin", "safetensors"))), n,
                   draw(st.sampled_from(places)), draw(st.booleans())),
            draw(st.sampled_from(("linear", "mlp1x_gelu", "mlp2x_gelu", "mlp4x_gelu"))),
            draw(st.sampled_from(DTYPES)), draw(st.integers(0, 2**16)), draw(st.booleans()))


@_few
@given(case=layouts())
def test_hypothesis_layouts(tmp_path_factory, case):
    layout, projector, dtype, seed, legacy = case
    folder = tmp_path_factory.mktemp("hyp") / "c"
    build(bare_spec({"projector_type": projector, "dtype": dtype}, format=layout.format,
                    shards=layout.shards, placement=layout.placement, seed=seed,
                    legacy_buffers=legacy), folder)
    if layout.shards == 1 and layout.index:
        write_single_index(folder, layout.format)
    before = sha256_tree(folder)
    for suffix in OUT_SUFFIXES:
        out = extract(folder, folder.parent / f"out{suffix}").output
        assert bit_differences(source_projector(folder), load_output(out)) == []
    assert sha256_tree(folder) == before


# --- what stage 2 consumes ------------------------------------------------------------------

@pytest.mark.parametrize("suffix", OUT_SUFFIXES)
@pytest.mark.parametrize("projector", TYPES)
def test_output_loads_like_pretrain_mm_mlp_adapter(built, tmp_path, projector, suffix):
    folder = built(Layout("bin", 3, "split"), projector, "bfloat16")
    out = extract(folder, tmp_path / f"mm_projector{suffix}").output
    model = bare_spec().model
    fresh = build_projector(projector, model.mm_hidden_size, model.hidden_size)
    fresh.to(torch.bfloat16).load_state_dict(get_w(load_output(out), PROJ))  # strict
    assert bit_differences(get_w(source_projector(folder), PROJ), fresh.state_dict()) == []
    if suffix == ".bin":  # torch.load can also map it in place: records are 64-byte aligned
        mapped = torch.load(out, map_location="cpu", weights_only=True, mmap=True)
        assert bit_differences(source_projector(folder), mapped) == []


def test_a_wrong_projector_fails_the_stage2_load(built, tmp_path):
    """The load check can fail: an mlp3x output does not load into an mlp2x projector."""
    out = extract(built(Layout("bin", 2), "mlp3x_gelu"), tmp_path / "p.bin").output
    model = bare_spec().model
    with pytest.raises(RuntimeError, match="Unexpected key"):
        build_projector("mlp2x_gelu", model.mm_hidden_size, model.hidden_size) \
            .load_state_dict(get_w(load_output(out), PROJ))


def test_foreign_torch_save_with_views_and_shared_storage(tmp_path):
    """A `.bin` written by torch.save itself: an OrderedDict state dict with metadata, a
    strided view, an offset slice and two names sharing one storage."""
    base = torch.randn(8, 12, dtype=torch.float16)
    own = build_projector("mlp2x_gelu", 6, 8).to(torch.bfloat16).state_dict()
    state = type(own)((f"model.mm_projector.{k}", v) for k, v in own.items())
    state._metadata = own._metadata  # what nn.Module.state_dict() attaches; pickled with it
    state["model.mm_projector.view.weight"] = base[:, ::2]
    state["model.mm_projector.slice.bias"] = base.view(-1)[5:13]
    state["model.mm_projector.twin.bias"] = base.view(-1)[5:13]
    folder = tmp_path / "c"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    expected = torch.load(folder / "pytorch_model.bin", weights_only=True)
    for suffix in OUT_SUFFIXES:
        out = extract(folder, tmp_path / f"p{suffix}").output
        assert bit_differences(dict(expected), load_output(out)) == []


# --- laziness: which files are opened, how many bytes are read -------------------------------

_OPENED: list | None = None


def _audit(event: str, args: tuple) -> None:
    # Sees every Python-level open: builtins.open, io.open, os.open, numpy.memmap. The
    # extractor never imports torch (tested below), so no C-level open escapes it.
    if event == "open" and _OPENED is not None and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(Path(os.fsdecode(args[0])).resolve())


sys.addaudithook(_audit)


def opened_during(fn) -> set[Path]:
    global _OPENED
    _OPENED = []
    try:
        fn()
        return set(_OPENED)
    finally:
        _OPENED = None


@pytest.mark.parametrize("fmt", ("bin", "safetensors"))
def test_shards_without_projector_keys_are_never_opened(built, tmp_path, fmt):
    folder = built(Layout(fmt, 3, "middle")).resolve()
    shards = open_folder(folder).files
    middle = shards[1]
    assert projector_files(folder) == {middle}
    opened = opened_during(lambda: extract(folder, tmp_path / "p.bin"))
    assert folder / middle in opened and folder / INDEX_NAMES[fmt] in opened
    assert not opened & {folder / s for s in shards if s != middle}
    # The instrument sees opens: reading every shard's directory shows all three.
    everything = opened_during(lambda: [tensors_in(folder / s, fmt) for s in shards])
    assert {folder / s for s in shards} <= everything


def test_a_full_folder_opens_only_index_and_projector_shard(tiny_checkpoint, tmp_path):
    """The default tiny checkpoint (tokenizer, CLIP tower, configs beside the shards): the
    extractor opens the index, the projector's shard and its own output, nothing else."""
    folder = tiny_checkpoint.resolve()
    out = tmp_path / "mm_projector.bin"
    opened = opened_during(lambda: extract(folder, out))
    inside = {p for p in opened if p.is_relative_to(folder)}
    assert inside == {folder / INDEX_NAMES["bin"]} | {folder / f for f in projector_files(folder)}
    assert all(p.parent == tmp_path.resolve() for p in opened - inside)
    assert bit_differences(source_projector(folder), load_output(out)) == []


@pytest.mark.parametrize("fmt", ("bin", "safetensors"))
def test_extraction_needs_only_the_projector_shard(built, tmp_path, fmt):
    """Copy just the index and the one shard (as a partial download would): it still works."""
    src = built(Layout(fmt, 3, "middle"))
    partial = tmp_path / "partial"
    partial.mkdir()
    (shard,) = projector_files(src)
    for name in (INDEX_NAMES[fmt], shard):
        (partial / name).write_bytes((src / name).read_bytes())
    out = extract(partial, tmp_path / "p.safetensors").output
    assert bit_differences(source_projector(src), load_output(out)) == []


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
@pytest.mark.parametrize("fmt", ("bin", "safetensors"))
def test_only_the_projector_bytes_are_read(built, tmp_path, fmt):
    """Bytes read by syscalls (rchar) stay within the projector's bytes plus the index and the
    shard's tensor directory, a small fraction of the shard that holds them."""
    folder = built(Layout(fmt, 2, "last"), vocab_size=8192)  # a big lm_head beside it
    shard = folder / open_folder(folder).files[1]
    extract(folder, tmp_path / "warm.bin")  # imports and caches settle first
    before = _rchar()
    result = extract(folder, tmp_path / "p.bin")
    read = _rchar() - before
    overhead = (folder / INDEX_NAMES[fmt]).stat().st_size + 64 * 1024
    assert result.nbytes <= read <= result.nbytes + overhead
    assert read < shard.stat().st_size / 10


def test_extraction_does_not_import_torch(built, tmp_path):
    folder = built(Layout("bin", 2))
    code = ("import sys; from harness.cli.app import main; rc = main(sys.argv[1:]); "
            "sys.exit(3 if 'torch' in sys.modules else rc)")
    done = subprocess.run([sys.executable, "-c", code, "extract", str(folder), "-o",
                           str(tmp_path / "p.bin")], check=False, capture_output=True,
                          text=True)
    assert done.returncode != 3, "extraction imported torch"
    assert done.returncode == 0 and "extracted 4 tensors" in done.stdout, done.stderr


# --- the command line -----------------------------------------------------------------------

def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_llava_flags_folder_output_keys_and_summary(built, tmp_path, capsys):
    folder = built(Layout("safetensors", 2, "split"))
    target = tmp_path / "stage1"
    target.mkdir()
    code, out, err = cli(capsys, "extract", "--model-path", folder, "--output", target,
                         "--keys", "mm_projector,lm_head", "--json")
    # --json: stdout is the JSON object alone; the usual line goes to stderr.
    assert code == 0 and "-> " + str(target / "mm_projector.bin") in err
    expected = source_projector(folder, ("mm_projector", "lm_head"))
    assert "lm_head.weight" in expected
    assert bit_differences(expected, load_output(target / "mm_projector.bin")) == []
    summary = json.loads(out)
    assert summary["files_total"] == 2 and set(summary["keys"]) == set(expected)
    assert summary["nbytes"] == sum(t.numel() * t.element_size() for t in expected.values())


@pytest.mark.parametrize("fmt", ("bin", "safetensors"))
def test_a_llava_next_checkpoint_gives_exactly_its_projector(tmp_path, fmt):
    """LLaVA-1.6 also stores image_newline and its tuned tower: extraction takes the
    projector alone, bit for bit (as the original's keys_to_match = ['mm_projector'])."""
    folder = tmp_path / "next"
    build(dataclasses.replace(build_spec("tiny-next", checkpoint={"format": fmt}),
                              with_tokenizer=False, with_vision_tower=False), folder)
    held = open_folder(folder).tensors
    assert "model.image_newline" in held and any("vision_tower" in k for k in held)
    expected = source_projector(folder)
    for suffix in OUT_SUFFIXES:
        result = extract(folder, tmp_path / f"mm_projector{suffix}")
        assert bit_differences(expected, load_output(result.output)) == []
        assert set(result.files_read) == projector_files(folder)


def test_output_is_deterministic(built, tmp_path):
    folder = built(Layout("bin", 2))
    a = extract(folder, tmp_path / "a" / "mm_projector.bin").output
    b = extract(folder, tmp_path / "b" / "mm_projector.bin").output
    assert a.read_bytes() == b.read_bytes()


# --- bad input: one line, exit 2, no output, inputs untouched ---------------------------------

@pytest.fixture
def fresh(tmp_path):
    """A private checkpoint to damage: `fresh(fmt, projector)` -> folder."""

    def make(fmt: str = "bin", projector: str = "mlp2x_gelu", **model) -> Path:
        folder = tmp_path / f"src-{fmt}-{projector}"
        build(bare_spec({"projector_type": projector, **model}, format=fmt, shards=2), folder)
        return folder

    return make


def _index(folder: Path) -> tuple[Path, dict]:
    ckpt = open_folder(folder)
    path = folder / ckpt.index_file
    return path, json.loads(path.read_text())


def _missing_shard(folder: Path) -> tuple[Path, str]:
    (shard,) = projector_files(folder)
    (folder / shard).unlink()
    return _index(folder)[0], f"names shard {shard}, which does not exist"


def _key_not_in_shard(folder: Path) -> tuple[Path, str]:
    path, index = _index(folder)
    first = min(index["weight_map"].values())
    index["weight_map"]["model.mm_projector.0.weight"] = first
    path.write_text(json.dumps(index))
    return folder / first, "index lists model.mm_projector.0.weight in this shard, but"


def _rewrite_projector_shard(folder: Path, edit) -> Path:
    (name,) = projector_files(folder)
    path = folder / name
    if path.suffix == ".safetensors":
        state = load_file(path)
        edit(state)
        save_file(state, path, metadata={"format": "pt"})
    else:
        state = torch.load(path, weights_only=True)
        edit(state)
        torch.save(state, path)
    return path


def _zero_element(folder: Path) -> tuple[Path, str]:
    def empty(state):
        state["model.mm_projector.2.weight"] = torch.empty(0, dtype=torch.float32)

    return _rewrite_projector_shard(folder, empty), "model.mm_projector.2.weight has shape [0]"


class _Payload:
    """Unpickling this would run code: the extractor must refuse before anything runs."""

    marker = ""

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _not_plain_weights(folder: Path) -> tuple[Path, str]:
    _Payload.marker = str(folder.parent / "pwned")

    def evil(state):
        state["model.mm_projector.0.bias"] = _Payload()

    return _rewrite_projector_shard(folder, evil), "not plain weights"


def _no_projector(folder: Path) -> tuple[Path, str]:
    return _index(folder)[0], "no tensor name contains mm_projector"


BAD = {"missing-shard": ("bin", "mlp2x_gelu", _missing_shard),
       "missing-shard-st": ("safetensors", "mlp2x_gelu", _missing_shard),
       "key-not-in-shard": ("bin", "mlp2x_gelu", _key_not_in_shard),
       "key-not-in-shard-st": ("safetensors", "mlp2x_gelu", _key_not_in_shard),
       "no-projector-keys": ("bin", "identity", _no_projector),
       "zero-element": ("bin", "mlp2x_gelu", _zero_element),
       "zero-element-st": ("safetensors", "mlp2x_gelu", _zero_element),
       "not-plain-weights": ("bin", "mlp2x_gelu", _not_plain_weights)}


def assert_refused(capsys, argv: list, out: Path, folder: Path, where: Path, phrase: str):
    before = sha256_tree(folder)
    code, stdout, err = cli(capsys, *argv)
    assert code == 2 and stdout == ""
    assert err.count("\n") == 1 and err.startswith(f"llava-harness: error: {where}: "), err
    assert phrase in err, err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*")), "output left"
    assert sha256_tree(folder) == before


@pytest.mark.parametrize("case", BAD)
@pytest.mark.parametrize("suffix", OUT_SUFFIXES)
def test_bad_input_is_one_line_exit_2_no_output(fresh, tmp_path, capsys, case, suffix):
    fmt, projector, damage = BAD[case]
    folder = fresh(fmt, projector, **({"mm_hidden_size": 64} if projector == "identity"
                                      else {}))
    where, phrase = damage(folder)
    out = tmp_path / "out" / f"mm_projector{suffix}"
    out.parent.mkdir()
    assert_refused(capsys, ["extract", folder, "-o", out], out, folder, where, phrase)
    assert not (folder.parent / "pwned").exists()


def test_keys_matching_nothing(fresh, tmp_path, capsys):
    folder = fresh()
    out = tmp_path / "p.bin"
    assert_refused(capsys, ["extract", folder, "-o", out, "--keys", "vision_resampler"], out,
                   folder, _index(folder)[0], "no tensor name contains vision_resampler")


def test_truncated_projector_shard(fresh, tmp_path, capsys):
    folder = fresh()
    (shard,) = projector_files(folder)
    data = (folder / shard).read_bytes()
    (folder / shard).write_bytes(data[: len(data) // 2])
    out = tmp_path / "p.bin"
    assert_refused(capsys, ["extract", folder, "-o", out], out, folder, folder / shard,
                   "truncated or corrupt")


def test_existing_output_is_kept_without_force(fresh, tmp_path, capsys):
    folder = fresh()
    out = tmp_path / "p.bin"
    out.write_bytes(b"keep me")
    code, _, err = cli(capsys, "extract", folder, "-o", out)
    assert code == 2 and "already exists; pass --force" in err and out.read_bytes() == b"keep me"
    assert cli(capsys, "extract", folder, "-o", out, "--force")[0] == 0
    assert bit_differences(source_projector(folder), load_output(out)) == []


def test_an_input_file_is_never_the_output(fresh, capsys):
    folder = fresh()
    (shard,) = projector_files(folder)
    before = sha256_tree(folder)
    code, _, err = cli(capsys, "extract", folder, "-o", folder / shard, "--force")
    assert code == 2 and "refusing to write over an input" in err
    assert sha256_tree(folder) == before


def test_unknown_output_extension(fresh, tmp_path, capsys):
    folder = fresh()
    out = tmp_path / "p.npz"
    assert_refused(capsys, ["extract", folder, "-o", out], out, folder, out,
                   "unknown output type .npz")


# --- the benchmark's machinery (figures come from `llava-harness bench extract`) ------------

def test_bench_extract_records_both_sides(built, tmp_path, capsys):
    from harness.report.results import load_results

    folder = built(Layout("bin", 2))
    out = tmp_path / "bench.json"
    assert main(["bench", "extract", "--checkpoint", str(folder), "--repeat", "1", "-o",
                 str(out)]) == 0
    (record,) = load_results(out).records
    assert record.suite == "bench-extract" and "outputs differ" not in (record.reason or "")
    for side in ("extract", "naive"):
        for metric, unit in (("wall_s", "s"), ("work_s", "s"), ("peak_rss", "MiB"),
                             ("peak_anon", "MiB")):
            assert record.metrics[f"{side}_{metric}"].unit == unit
            assert record.metrics[f"{side}_{metric}"].value > 0
    assert "outputs bit-identical: True" in capsys.readouterr().out


# --- real size ------------------------------------------------------------------------------

@pytest.mark.realsize
@pytest.mark.parametrize("fmt", ("bin", "safetensors"))
def test_realsize_7b_extraction(realsize_checkpoint_factory, tmp_path, fmt):
    folder = realsize_checkpoint_factory("llava-v1.5-7b", checkpoint={"format": fmt})
    result = extract(folder, tmp_path / "mm_projector.bin")
    assert result.numel == 20_979_712 and len(result.files_read) == 1
    assert bit_differences(source_projector(folder), load_output(result.output)) == []

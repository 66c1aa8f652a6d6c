"""Quantized load: every mode bitsandbytes 0.50 runs on CPU (int8, nf4, nf4-dq, fp4, besides
fp16/bf16) loads a tiny LLaVA with the projector and vision tower unquantized, holds exactly
the bytes the theoretical-footprint formula predicts, reports the unquantized parameter count,
drifts from the float32 model within the stated tolerances and yields a complete benchmark
record; the formula itself is checked against hand-computed values down to the 7B. Each check
is also run against a planted defect. GPU cases (tiny and real-size llava-v1.5-7b, every mode,
the NF4-DQ load-peak goal) are marked `gpu`.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from harness.bench.measure import NvmlSampler
from harness.bench.quant import (
    GOALS,
    ModeResult,
    QuantBench,
    BenchError,
    child_job,
    mode_record,
    required_metrics,
    parts_from_spec,
    run,
    with_theory,
)
from harness.bench.quant_child import drift_metrics, run_child, structure_problems
from harness.cli.app import main as cli_main
from harness.ops.quant import (
    cpu_4bit_problem,
    LinearBytes,
    ModelParts,
    bnb_config,
    linear_bytes,
    measured_footprint,
    parse_modes,
    parts_from_folder,
    theoretical_footprint,
)
from harness.report.environment import harness_repo
from harness.report.results import load_results
from harness.synth.presets import build_spec
from harness.tolerances import tolerance

# bitsandbytes' CPU 4-bit kernel packs weights in blocks of 32 output rows: the tiny default's
# intermediate size (172) does not divide, 192 does.
QUANT_MODEL = {"intermediate_size": 192}
FLOAT_MODES = ("fp16", "bf16")
BNB_MODES = ("int8", "nf4", "nf4-dq", "fp4")
# Small token counts: the suite checks that figures are produced, not what they are.
SMALL = {"prompt_tokens": 8, "new_tokens": 3, "batch": 1, "repeat": 2}


@pytest.fixture(scope="module")
def tiny_quant(tiny_checkpoint_factory) -> Path:
    return tiny_checkpoint_factory(model=QUANT_MODEL)


@pytest.fixture(scope="module")
def parts(tiny_quant) -> ModelParts:
    return parts_from_folder(tiny_quant)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("quant-work")


def _bench(folder: Path, modes=("fp32",), device="cpu", **kw) -> QuantBench:
    return QuantBench(checkpoint=folder, name="tiny", modes=tuple(modes), device=device,
                      **{**SMALL, **kw})


@pytest.fixture(scope="module")
def reference(tiny_quant, parts, work) -> ModeResult:
    """The float32 run, in this process: it writes the probe logits the others compare with."""
    bench = _bench(tiny_quant)
    out = run_child(child_job(bench, "fp32", parts, work))
    return ModeResult("fp32", out["metrics"], out["problems"])


def _run_in_process(folder: Path, mode: str, parts, work: Path) -> ModeResult:
    out = run_child(child_job(_bench(folder, (mode,)), mode, parts, work))
    return ModeResult(mode, out["metrics"], out["problems"])


def _drift_problems(metrics: dict, mode: str) -> list[str]:
    tol = tolerance(f"quant.drift.{mode}")
    diff, top1 = metrics["max_abs_logit_diff"][0], metrics["top1_agreement"][0]
    out = []
    if not diff <= tol.atol:
        out.append(f"max |logit diff| {diff:.4g} > {tol.atol}")
    if not top1 >= tol.top1:
        out.append(f"top-1 agreement {top1:.3f} < {tol.top1}")
    return out


# --- the formula against hand-computed values ---------------------------------------------

# (mode, out, in) -> (weight bytes, state bytes), worked out by hand:
#   int8: n int8 + out float32 row scales; nf4/fp4: n/2 packed + ceil(n/64) float32 absmax +
#   64-byte code book; nf4-dq: n/2 + ceil(n/64) uint8 absmax + ceil(blocks/256) float32 +
#   4-byte offset + 64-byte code book + 1024-byte dynamic map (each layer's own copy).
HAND = {
    ("fp32", 32, 64): (8192, 0), ("fp16", 32, 64): (4096, 0), ("bf16", 32, 64): (4096, 0),
    ("int8", 32, 64): (2048, 128),
    ("nf4", 32, 64): (1024, 32 * 4 + 64),
    ("fp4", 32, 64): (1024, 32 * 4 + 64),
    ("nf4-dq", 32, 64): (1024, 32 + 4 + 4 + 64 + 1024),
    # n = 7000 (not a multiple of the block): 110 blocks, the last one partial.
    ("int8", 100, 70): (7000, 400),
    ("nf4", 100, 70): (3500, 110 * 4 + 64),
    ("nf4-dq", 100, 70): (3500, 110 + 4 + 4 + 64 + 1024),
    # Llama-2-7B's up_proj: n = 45,088,768, 704,512 blocks, 2,752 second-level blocks.
    ("nf4-dq", 11008, 4096): (22_544_384, 704_512 + 2752 * 4 + 4 + 64 + 1024),
    ("nf4", 11008, 4096): (22_544_384, 704_512 * 4 + 64),
    ("int8", 11008, 4096): (45_088_768, 11008 * 4),
}


@pytest.mark.parametrize("key", list(HAND), ids=lambda k: f"{k[0]}-{k[1]}x{k[2]}")
def test_linear_bytes_match_hand_computation(key):
    mode, out_f, in_f = key
    assert linear_bytes(mode, out_f, in_f) == LinearBytes(*HAND[key])


def test_bits_per_parameter_limits():
    # Per weight at real-size shapes: 4 + 32/64 = 4.5 (nf4), 4 + 8/64 + 32/16384 = 4.127
    # (nf4-dq) plus the per-layer constants, 8 + 32/4096 (int8 row scales).
    big = ModelParts(((11008, 4096),))
    bits = {m: theoretical_footprint(m, big).bits_per_param for m in BNB_MODES}
    assert bits["nf4"] == pytest.approx(4.5, abs=1e-4)
    assert bits["fp4"] == bits["nf4"]
    assert bits["nf4-dq"] == pytest.approx(4 + 8 / 64 + 32 / 16384, abs=1e-3)
    assert bits["int8"] == pytest.approx(8 + 32 / 4096, abs=1e-6)


# llava-v1.5-7b by hand. Language-model linears per layer: 4 x 4096^2 + 3 x 4096 x 11008
# = 202,375,168, x 32 layers = 6,476,005,376. Unquantized: embeddings and lm_head 32000 x 4096
# each; 65 RMSNorms x 4096 = 266,240; projector 1024x4096+4096 + 4096x4096+4096 = 20,979,712;
# CLIP ViT-L/14-336: embeddings 1024 + 3x14x14x1024 + 577x1024 = 1,193,984, two pre/post
# LayerNorms 2 x 2048, 24 layers x (4 x (1024^2+1024) + 2 x 2048 + 1024x4096+4096 +
# 4096x1024+1024) = 24 x 12,596,224 -> 303,507,456. Buffers: inv_freq and original_inv_freq
# 2 x 64 float32 + CLIP position ids 577 int64 = 5,128 bytes.
LLAVA_7B = {
    "quantizable": 6_476_005_376,
    "unquantized": {"embeddings": 131_072_000, "lm_head": 131_072_000, "norms": 266_240,
                    "projector": 20_979_712, "vision_tower": 303_507_456},
    "buffer_bytes": 5_128,
    # nf4-dq: weights 6,476,005,376 / 2 = 3,238,002,688; state: 101,187,584 uint8 absmax +
    # 32 x (4 x 1,024 + 3 x 2,752) x 4 = 1,581,056 second-level + 224 x (4 + 64 + 1,024) =
    # 244,608 -> 103,013,248; unquantized 586,897,408 params x 2 bytes = 1,173,794,816.
    "nf4-dq": 3_238_002_688 + 103_013_248 + 1_173_794_816 + 5_128,
    "fp16": (6_476_005_376 + 586_897_408) * 2 + 5_128,
}


def test_llava_7b_theory_matches_hand_computation():
    parts = parts_from_spec(build_spec("llava-v1.5-7b").model)
    assert len(parts.linears) == 224
    assert parts.quantizable_params == LLAVA_7B["quantizable"]
    assert parts.unquantized == LLAVA_7B["unquantized"]
    assert parts.buffer_bytes == LLAVA_7B["buffer_bytes"]
    assert theoretical_footprint("nf4-dq", parts).total == LLAVA_7B["nf4-dq"]
    assert theoretical_footprint("fp16", parts).total == LLAVA_7B["fp16"]
    # The "about 3.9 GB" for the language model: quantized linears + embeddings and
    # lm_head in float16.
    lm = theoretical_footprint("nf4-dq", ModelParts(parts.linears, {
        "embeddings": 131_072_000, "lm_head": 131_072_000}))
    assert lm.total / 1e9 == pytest.approx(3.86, abs=0.01)


def test_formula_tells_modes_apart():
    """Planted defect for the footprint check: the wrong mode's theory is off by far more than
    the tolerance, and double quant differs from plain NF4 (get_memory_footprint can't tell)."""
    parts = parts_from_spec(build_spec("llava-v1.5-7b").model)
    totals = {m: theoretical_footprint(m, parts).total for m in ("nf4", "nf4-dq", "int8")}
    rtol = tolerance("quant.footprint").rtol
    for a, b in (("nf4", "nf4-dq"), ("nf4", "int8")):
        assert abs(totals[a] / totals[b] - 1) > 10 * rtol


# --- loads on CPU: footprint, structure, parameter count, drift, record ---------------------

@pytest.mark.parametrize("mode", FLOAT_MODES + BNB_MODES)
def test_mode_loads_exact_footprint_unquantized_parts_and_drift(tiny_quant, parts, work,
                                                                 reference, mode):
    bench = _bench(tiny_quant, (mode,))
    assert reference.problems == []
    result = _run_in_process(tiny_quant, mode, parts, work)
    assert result.problems == [], result.problems  # projector/tower/lm_head dtypes, layers
    m = result.metrics
    assert m["footprint"][0] == theoretical_footprint(mode, parts).total  # byte for byte
    if mode not in ("nf4", "nf4-dq", "fp4"):
        # Running moves LLM.int8's row scales into the layer's state: still counted, unchanged.
        # (4-bit weights are repacked on CPUs with AVX512-BF16; the bench reports that size.)
        assert m["footprint_after_generate"][0] == m["footprint"][0]
    assert m["num_parameters"][0] == parts.num_parameters  # transformers #25978
    assert _drift_problems(m, mode) == []
    record = mode_record(bench, result, parts, None)
    assert record.outcome == "passed", record.reason
    missing = set(required_metrics("cpu", subprocess=False)) - set(record.metrics)
    assert not missing, missing
    assert all(metric.unit for metric in record.metrics.values())
    env = record.environment
    assert env.cpu_model
    if harness_repo() is not None:  # from a checkout the record names the commit
        assert env.git_commit
    assert all(env.libraries.get(lib) for lib in ("torch", "transformers", "bitsandbytes"))


def test_reference_record_is_complete(tiny_quant, parts, reference):
    record = mode_record(_bench(tiny_quant), reference, parts, None)
    assert record.outcome == "passed", record.reason
    assert record.metrics["max_abs_logit_diff"].value == 0.0
    assert record.metrics["top1_agreement"].value == 1.0
    assert record.metrics["footprint_ratio"].value == 1.0


def _load(folder: Path, mode: str, skip_extra: tuple[str, ...] = ()):
    from harness.ops.load import load

    config = bnb_config(mode)
    if skip_extra:
        config.llm_int8_skip_modules = [*config.llm_int8_skip_modules, *skip_extra]
    return load(folder, None, "llava-tiny", device="cpu", dtype="float16",
                vision_tower_dtype="float16", quantization_config=config).model


def _job_for(parts, mode: str) -> dict:
    return {"expected_quantized_layers": len(parts.linears), "expected_parameters":
            parts.num_parameters, "mode": mode}


def test_planted_layer_left_unquantized_fails_footprint_and_structure(tiny_quant, parts):
    model = _load(tiny_quant, "nf4", skip_extra=("model.layers.0.mlp.down_proj",))
    problems = structure_problems(model, torch.float16, _job_for(parts, "nf4"))
    assert any("bitsandbytes layers, expected" in p for p in problems), problems
    result = ModeResult("nf4", {"footprint": (measured_footprint(model), "B")}, [])
    _, problems = with_theory(result, _bench(tiny_quant, ("nf4",)), parts)
    assert any("footprint" in p and "theory" in p for p in problems), problems


def test_planted_defects_in_dtypes_and_parameter_count(tiny_quant, parts):
    model = _load(tiny_quant, "nf4-dq")
    job = _job_for(parts, "nf4-dq")
    assert structure_problems(model, torch.float16, job) == []
    # transformers 5 counts a packed 4-bit weight as numel x 2 x element size (#25978 fixed):
    # the raw element count is smaller than the unquantized count it reports.
    assert sum(p.numel() for p in model.parameters()) < parts.num_parameters
    model.is_loaded_in_4bit = False  # the count as transformers <= 4.33 gave it
    assert any("num_parameters()" in p for p in structure_problems(model, torch.float16, job))
    model.is_loaded_in_4bit = True
    model.get_model().mm_projector.float()
    problems = structure_problems(model, torch.float16, job)
    assert any(p.startswith("mm_projector dtype float32") for p in problems), problems


def test_planted_defect_exceeds_drift_tolerance(tiny_quant, parts, work, reference):
    """Doubling one layer's 4-bit scales (a wrong absmax) must be caught."""
    from harness.model.probe import probe_logits
    from harness.ops.load import load

    loaded = load(tiny_quant, None, "llava-tiny", device="cpu", dtype="float16",
                  vision_tower_dtype="float16", quantization_config=bnb_config("nf4"))
    job = {"reference": str(work / "reference.safetensors")}
    with torch.inference_mode():
        good = drift_metrics(probe_logits(loaded.model, loaded.image_processor), job)
        assert _drift_problems(good, "nf4") == []
        for module in loaded.model.get_model().layers[0].modules():
            state = getattr(getattr(module, "weight", None), "quant_state", None)
            if state is not None:
                state.absmax.mul_(2.0)
        bad = drift_metrics(probe_logits(loaded.model, loaded.image_processor), job)
    assert _drift_problems(bad, "nf4"), bad


# --- what runs where ------------------------------------------------------------------------

def test_cpu_4bit_kernel_constraint_is_a_skip_not_a_crash(tiny_checkpoint_factory):
    from bitsandbytes.functional import has_avx512bf16

    folder = tiny_checkpoint_factory()  # intermediate 172
    problem = cpu_4bit_problem(parts_from_folder(folder).linears)
    if not has_avx512bf16():
        assert problem is None
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes takes its generic 4-bit path")
    assert "172 x 64" in problem
    records = run(_bench(folder, ("nf4", "fp4")))
    assert [r.outcome for r in records] == ["skipped", "skipped"]
    assert "divisible by 32" in records[0].reason


def test_bench_end_to_end_in_subprocesses(tiny_quant, tmp_path, capsys):
    out = tmp_path / "quant.json"
    code = cli_main(["bench", "quant", "--checkpoint", str(tiny_quant), "--device", "cpu",
                     "--modes", "int8", "--prompt-tokens", "8", "--new-tokens", "3",
                     "--repeat", "2", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "| case" in captured.out and f"{tiny_quant.resolve().name}-int8" in captured.out
    assert "[0] reference fp32" in captured.err and "[1/1]" in captured.err
    results = load_results(out)
    (record,) = results.records
    assert record.case == f"{tiny_quant.resolve().name}-int8-cpu"
    assert record.outcome == "passed", record.reason
    assert not set(required_metrics("cpu")) - set(record.metrics)
    assert record.metrics["footprint_ratio"].value == 1.0
    assert _drift_problems({k: (v.value, v.unit) for k, v in record.metrics.items()},
                           "int8") == []
    assert results.settings["device"] == "cpu" and results.settings["reference_mode"] == "fp32"
    assert results.environment.libraries["bitsandbytes"]


def test_the_tiny_bench_measures_every_mode(tmp_path, monkeypatch, capsys):
    """`bench quant --preset tiny` measures tiny-quant, which differs from tiny only in a
    192-wide MLP and fits every CPU kernel, so no mode is skipped."""
    import argparse

    from harness.cli.commands.quant import _checkpoint
    from harness.synth.presets import preset

    monkeypatch.setenv("LLAVA_HARNESS_CACHE", str(tmp_path))
    folder, name = _checkpoint(argparse.Namespace(checkpoint=None, format=None, preset="tiny"))
    assert name == "tiny-quant" and "tiny-quant" in capsys.readouterr().err
    assert cpu_4bit_problem(parts_from_folder(folder).linears) is None
    tiny, quant = preset("tiny").model, preset("tiny-quant").model
    assert quant.replace(name="tiny", intermediate_size=tiny.intermediate_size) == tiny


def test_the_gpu_session_names_its_baseline_after_the_hardware():
    from harness.bench.session import baseline_name

    assert baseline_name({"gpu_name": "NVIDIA H200"}, dry_run=False) == "quant-nvidia-h200"
    assert baseline_name({"cpu_model": "AMD EPYC 9R14 96-Core"}, dry_run=True) == \
        "quant-cpu-amd-epyc-9r14-96-core"
    assert baseline_name(None, dry_run=False) == "quant-unknown"


# --- the command line -----------------------------------------------------------------------

def _cli_error(capsys, *args) -> str:
    try:
        code = cli_main(["bench", "quant", *map(str, args)])
    except SystemExit as exc:  # a bad option value: argparse exits at parse time
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_input_is_one_line(tiny_quant, capsys, tmp_path):
    assert "nf5" in _cli_error(capsys, "--checkpoint", tiny_quant, "--modes", "int8,nf5")
    assert "twice" in _cli_error(capsys, "--checkpoint", tiny_quant, "--modes", "nf4,nf4")
    assert "not a folder" in _cli_error(capsys, "--checkpoint", tmp_path / "nope")
    assert "at least 2" in _cli_error(capsys, "--checkpoint", tiny_quant, "--new-tokens", "1",
                                      "--device", "cpu")
    line = _cli_error(capsys, "--checkpoint", tiny_quant, "--prompt-tokens", "500",
                      "--device", "cpu")
    assert "config.json" in line and "max_position_embeddings" in line
    if not torch.cuda.is_available():
        assert "no CUDA" in _cli_error(capsys, "--checkpoint", tiny_quant, "--device", "cuda")


def test_parse_modes_and_bench_validation(tiny_quant):
    assert parse_modes("fp16,nf4-dq") == ("fp16", "nf4-dq")
    with pytest.raises(BenchError, match="expected cpu or cuda"):
        _bench(tiny_quant, device="tpu")


# --- NVML, through a stand-in for the driver library ----------------------------------------

class FakeNvml:
    """The few pynvml calls the sampler makes, answering like a one-GPU driver."""

    class NVMLError(Exception):
        pass

    def __init__(self, used: list[int], processes: dict[int, int | None]):
        self.used, self.processes = used, processes

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, index):
        return "handle-0"

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if uuid != "GPU-abc":
            raise self.NVMLError("not found")
        return "handle-0"

    def nvmlDeviceGetIndex(self, handle):
        return 0

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(used=self.used[0], total=2**34, free=2**34 - self.used[0])

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [SimpleNamespace(pid=pid, usedGpuMemory=used)
                for pid, used in self.processes.items()]


def test_nvml_sampler_process_and_device_sources():
    import os

    fake = FakeNvml([1000], {os.getpid(): 5000, 1: 70})
    sampler = NvmlSampler(nvml=fake)
    sampler.start("abc")
    fake.processes[os.getpid()] = 9000
    assert sampler.peak() == (9000, "process")
    sampler.stop()
    # In a container the driver lists host PIDs: fall back to the device, minus the baseline
    # taken before this process's CUDA context.
    fake = FakeNvml([1000], {12345: 5000})
    sampler = NvmlSampler(nvml=fake)
    fake.used[0] = 4000
    sampler.start("GPU-zzz")  # unknown UUID: with one GPU, index 0
    assert sampler.peak() == (3000, "device")
    sampler.reset()
    fake.used[0] = 2500
    assert sampler.peak() == (3000, "device")  # peak since reset, not the current value
    sampler.stop()
    # The driver cannot tell this process's memory (None): the device's figure is used.
    fake = FakeNvml([1000], {os.getpid(): None})
    sampler = NvmlSampler(nvml=fake)
    sampler.start("GPU-abc")
    assert sampler.source == "device"
    sampler.stop()


# --- GPU (skipped on CPU with a reason) -----------------------------------------------------

def _check_gpu_records(records, llava_record) -> None:
    problems = []
    for r in records:
        for name, metric in r.metrics.items():
            if math.isfinite(metric.value):
                llava_record(f"{r.case}.{name}", metric.value, metric.unit, metric.direction)
        if r.outcome != "passed":
            problems.append(f"{r.case}: {r.outcome}: {r.reason}")
            continue
        missing = set(required_metrics("cuda")) - set(r.metrics)
        if missing:
            problems.append(f"{r.case}: missing {sorted(missing)}")
    assert not problems, problems


ALL_MODES = ("fp16", "bf16", "int8", "nf4", "nf4-dq", "fp4")


@pytest.mark.gpu
def test_gpu_tiny_every_mode(tiny_quant, llava_record):
    records = run(_bench(tiny_quant, ALL_MODES, device="cuda"))
    _check_gpu_records(records, llava_record)
    # Drift against the float16 reference there, with the CPU-calibrated tolerances.
    for mode, r in zip(ALL_MODES, records):
        metrics = {k: (v.value, v.unit) for k, v in r.metrics.items()}
        assert _drift_problems(metrics, mode) == [], (r.case, metrics)


@pytest.mark.gpu
@pytest.mark.realsize
def test_gpu_llava_7b_every_mode(llava_cache, llava_record):
    """Real-size llava-v1.5-7b, every mode, each in its own process; the NF4-DQ goal (peak
    allocated at load <= 1.10x theory) is part of each record's outcome."""
    from harness.synth.cache import cached_build

    folder = cached_build(build_spec("llava-v1.5-7b", with_vision_tower=True), llava_cache)
    bench = QuantBench(checkpoint=folder, name="llava-v1.5-7b", modes=ALL_MODES,
                       device="cuda", prompt_tokens=64, new_tokens=64, batch=1, repeat=3)
    records = run(bench)
    _check_gpu_records(records, llava_record)
    nf4_dq = next(r for r in records if r.case.endswith("-nf4-dq-cuda"))
    assert nf4_dq.metrics["load_peak_ratio"].value <= GOALS["nf4-dq"]

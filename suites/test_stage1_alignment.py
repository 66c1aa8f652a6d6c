"""Stage-1 feature alignment in miniature, and the training utilities under it.

Stage 1 the LLaVA way, on tiny checkpoints per projector type and architecture: a fresh
projector, `model.requires_grad_(False)` then only `mm_projector` trainable, AdamW at 1e-3 with
cosine decay and 3% warmup on `plain` image-caption pairs. Proven: the trainable count is the
projector's (formula and module); afterwards every other tensor is bit-identical, every
projector tensor changed and the held-out loss fell; the saved folder holds only the projector
(`model.mm_projector.*` in mm_projector.bin) plus config.json; loaded through the
projector-only path onto a language-model-only base, it gives the trained model's logits bit
for bit. Each check is also shown failing on a planted defect.

The data utilities are checked against LLaVA's formats: `plain` (`<image>` + caption + "\\n",
loss on the caption) and `vicuna_v1` (loss on the assistant replies), and its collator.
"""

from __future__ import annotations

import copy
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from harness.model.backbone import load_language_model
from harness.model.probe import probe_logits
from harness.model.splice import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from harness.ops.counts import module_params, param_count, projector_params
from harness.ops.load import LoadWarning, load
from harness.tolerances import tolerance
from harness.train import stage1
from harness.train.data import (
    V1_SYSTEM,
    caption_of,
    collate,
    instruct_samples,
    labelled,
    plain_samples,
    tokenizer_image_token,
    v1_segments,
)
from harness.train.loop import TrainError, make_optimizer, train, warmup_steps

STEPS = 16        # optimizer steps per stage-1 run (the first at lr 0: warmup)
BATCH = 4
DEFECT_STEPS = 4  # enough to move (or not move) every tensor
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")


@dataclass(frozen=True)
class Case:
    arch: str
    projector: str

    @property
    def id(self) -> str:
        return f"{self.arch}-{self.projector}"


# Every projector type on both architectures: after the first build, a case costs well under
# a second (tiny checkpoints share the tokenizer and tower code paths; one thread).
CASES = [Case(arch, projector) for arch in ("llama", "mistral")
         for projector in ("linear", "mlp2x_gelu", "mlp3x_gelu")]
CHEAP = Case("llama", "linear")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models train faster on one thread than on two contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _load(path, base=None, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LoadWarning)
        return load(path, base, "llava-" + Path(path).name, device="cpu", dtype="float32", **kw)


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint_factory):
    """`loaded(case)` -> (checkpoint folder, Loaded); each case loaded once per module."""
    cache: dict[Case, tuple] = {}

    def get(case: Case):
        if case not in cache:
            folder = tiny_checkpoint_factory(model={"arch": case.arch,
                                                    "projector_type": case.projector})
            cache[case] = folder, _load(folder)
        return cache[case]
    return get


def _prepared(loaded, case: Case, seed: int = 0):
    """A copy of the case's model with a fresh projector, frozen for stage 1."""
    _, base = loaded(case)
    model = copy.deepcopy(base.model)
    stage1.init_projector(model, seed)
    stage1.freeze_for_stage1(model)
    return model, base.tokenizer, base.image_processor


@pytest.fixture(scope="module")
def lm_base(tmp_path_factory):
    """`lm_base(folder)` -> a Vicuna-like base made from the checkpoint: its language model
    alone (no projector, no tower) and its tokenizer, the base a stage-1 projector goes onto."""
    root = tmp_path_factory.mktemp("lm-base")
    cache: dict[Path, Path] = {}

    def get(src: Path) -> Path:
        if src not in cache:
            out = root / f"vicuna-like-{len(cache)}"
            load_language_model(src).save_pretrained(out)
            for name in TOKENIZER_FILES:
                shutil.copy(src / name, out / name)
            cache[src] = out
        return cache[src]
    return get


@dataclass
class Trained:
    folder: Path
    model: torch.nn.Module
    image_processor: object
    run: stage1.Stage1Run
    saved: Path


@pytest.fixture(scope="module")
def trained(loaded, tmp_path_factory):
    """`trained(case)` -> one stage-1 run per case, saved: shared by the checks below."""
    root = tmp_path_factory.mktemp("stage1")
    cache: dict[Case, Trained] = {}

    def get(case: Case) -> Trained:
        if case not in cache:
            folder, _ = loaded(case)
            model, tokenizer, processor = _prepared(loaded, case)
            run = stage1.train_stage1(model, tokenizer, processor, steps=STEPS,
                                      batch_size=BATCH)
            saved = stage1.save_stage1(model, root / f"llava-{case.id}-stage1")
            cache[case] = Trained(folder, model, processor, run, saved)
        return cache[case]
    return get


# --- stage 1: the checks, per case -------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_trainable_count_is_the_projector_count(loaded, case):
    model, _, _ = _prepared(loaded, case)
    config = model.config
    formula = projector_params(case.projector, config.mm_hidden_size, config.hidden_size)
    assert formula == module_params(case.projector, config.mm_hidden_size, config.hidden_size)
    assert formula == param_count(model.get_model().mm_projector)
    assert stage1.expected_trainable(config) == formula
    assert stage1.freezing_problems(model, formula) == []
    assert formula < param_count(model) // 10  # the check means something: most is frozen


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_only_the_projector_changed(trained, case):
    result = trained(case)
    assert stage1.update_problems(result.run.before, result.model) == []
    # The vision tower is part of the model and must be among the tensors compared.
    assert any(".vision_tower." in k for k in result.run.before)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_held_out_loss_fell(trained, case):
    run = trained(case).run
    assert len(run.losses) == STEPS
    drop = tolerance("stage1.loss_drop").atol
    assert stage1.loss_problems(run.held_out_before, run.held_out_after, drop) == []


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_saved_folder_holds_only_the_projector(trained, case):
    result = trained(case)
    assert sorted(p.name for p in result.saved.iterdir()) == ["config.json", "mm_projector.bin"]
    assert stage1.saved_problems(result.saved, result.model) == []
    saved = torch.load(result.saved / "mm_projector.bin", weights_only=True)
    assert all(k.startswith("model.mm_projector.") for k in saved)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_projector_only_load_gives_the_trained_logits(trained, loaded, lm_base, case):
    result = trained(case)
    reloaded = _load(result.saved, lm_base(result.folder))
    assert reloaded.kind == "projector"
    expected = probe_logits(result.model, result.image_processor)
    assert torch.equal(probe_logits(reloaded.model, reloaded.image_processor), expected)
    # Training moved the logits: the equality above could not hold by accident.
    _, before = loaded(case)
    assert not torch.equal(probe_logits(before.model, before.image_processor), expected)


# --- stage 1: each check fails on a planted defect ----------------------------------------------

def test_freezing_check_catches_an_unfrozen_tensor(loaded):
    model, tokenizer, processor = _prepared(loaded, CHEAP)
    model.lm_head.weight.requires_grad_(True)  # planted: a frozen tensor made trainable
    problems = stage1.freezing_problems(model, stage1.expected_trainable(model.config))
    assert "lm_head.weight is trainable but not part of the projector" in problems
    assert any("trainable parameters, expected" in p for p in problems)
    run = stage1.train_stage1(model, tokenizer, processor, steps=DEFECT_STEPS, batch_size=2)
    assert stage1.update_problems(run.before, model) == ["lm_head.weight (frozen) changed"]


def test_freezing_check_catches_a_missing_requires_grad_false(loaded):
    _, base = loaded(CHEAP)
    model = copy.deepcopy(base.model)
    for p in model.get_model().mm_projector.parameters():  # planted: no requires_grad_(False)
        p.requires_grad = True
    problems = stage1.freezing_problems(model, stage1.expected_trainable(model.config))
    assert any(p.startswith("model.layers.0.") for p in problems)
    assert "model.embed_tokens.weight is trainable but not part of the projector" in problems


def test_update_check_catches_a_projector_tensor_left_unchanged(loaded):
    model, tokenizer, processor = _prepared(loaded, CHEAP)
    skipped = "model.mm_projector.bias"
    groups = [{"params": [p for n, p in model.named_parameters()
                          if p.requires_grad and n != skipped]}]  # planted: one left out
    assert stage1.freezing_problems(model, stage1.expected_trainable(model.config)) == []
    run = stage1.train_stage1(model, tokenizer, processor, steps=DEFECT_STEPS, batch_size=2,
                              param_groups=groups)
    assert stage1.update_problems(run.before, model) == [f"{skipped} (projector) did not change"]


def test_loss_check_catches_no_learning(loaded):
    model, tokenizer, processor = _prepared(loaded, CHEAP)
    run = stage1.train_stage1(model, tokenizer, processor, steps=DEFECT_STEPS, batch_size=2,
                              lr=0.0)  # planted: nothing learns
    assert run.held_out_after == run.held_out_before
    drop = tolerance("stage1.loss_drop").atol
    assert stage1.loss_problems(run.held_out_before, run.held_out_after, drop)
    assert len(stage1.update_problems(run.before, model)) == len(
        list(model.get_model().mm_projector.parameters()))


def test_saved_check_catches_wrong_contents(trained, tmp_path):
    result = trained(CHEAP)
    folder = tmp_path / "tampered"
    shutil.copytree(result.saved, folder)
    weights = torch.load(folder / "mm_projector.bin", weights_only=True)
    weights["lm_head.weight"] = result.model.lm_head.weight.detach().clone()  # planted
    weights.pop("model.mm_projector.bias")
    weights["model.mm_projector.weight"] = weights["model.mm_projector.weight"] + 1e-3
    torch.save(weights, folder / "mm_projector.bin")
    assert stage1.saved_problems(folder, result.model) == [
        "mm_projector.bin holds lm_head.weight, not a projector tensor of the model",
        "mm_projector.bin lacks model.mm_projector.bias",
        "mm_projector.bin: model.mm_projector.weight differs from the model's"]


def test_reload_check_catches_a_perturbed_projector(trained, lm_base, tmp_path):
    result = trained(CHEAP)
    folder = tmp_path / "perturbed-stage1"
    shutil.copytree(result.saved, folder)
    weights = torch.load(folder / "mm_projector.bin", weights_only=True)
    weights["model.mm_projector.bias"][0] += 1e-3  # planted
    torch.save(weights, folder / "mm_projector.bin")
    reloaded = _load(folder, lm_base(result.folder))
    assert not torch.equal(probe_logits(reloaded.model, reloaded.image_processor),
                           probe_logits(result.model, result.image_processor))


def test_saving_refuses_to_overwrite(trained):
    from harness.checkpoint.atomic import OutputExistsError

    result = trained(CHEAP)
    with pytest.raises(OutputExistsError):
        stage1.save_stage1(result.model, result.saved)


# --- the training loop -------------------------------------------------------------------------

def test_training_is_deterministic(loaded):
    runs = []
    for _ in range(2):
        model, tokenizer, processor = _prepared(loaded, CHEAP)
        run = stage1.train_stage1(model, tokenizer, processor, steps=DEFECT_STEPS, batch_size=2)
        runs.append((run.losses, stage1.projector_state(model)))
    (losses_a, state_a), (losses_b, state_b) = runs
    assert losses_a == losses_b
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_schedule_is_cosine_with_warmup():
    steps, lr = 100, 1e-3
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer, schedule = make_optimizer([{"params": [param]}], steps, 0.03, lr, 0.0)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert warmup_steps(steps, 0.03) == 3
    assert lrs[:4] == pytest.approx([0.0, lr / 3, 2 * lr / 3, lr])
    assert lrs[4:] == sorted(lrs[4:], reverse=True)  # decays monotonically after warmup
    halfway = 3 + (steps - 3) // 2
    assert lrs[halfway] == pytest.approx(lr / 2, rel=0.05)
    assert lrs[-1] < lr / 1000


def test_param_groups_keep_their_own_learning_rates():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer, _ = make_optimizer([{"params": [a], "lr": 2e-5}, {"params": [b]}], 10, 0.0,
                                  1e-3, 0.0)
    assert [g["lr"] for g in optimizer.param_groups] == [2e-5, 1e-3]


def test_a_frozen_parameter_in_the_groups_is_an_error(loaded):
    model, tokenizer, processor = _prepared(loaded, CHEAP)
    groups = [{"params": [model.lm_head.weight]}]
    batch = collate(plain_samples(tokenizer, 2, 0), processor, model.config)
    with pytest.raises(TrainError, match="requires_grad=False"):
        train(model, [batch], groups, 2)


# --- data: LLaVA's formats ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(loaded):
    return loaded(CHEAP)[1].tokenizer


def _text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text).input_ids[1:]  # without BOS


def test_plain_sample_is_image_then_caption_with_loss_on_the_caption(tokenizer):
    sample = plain_samples(tokenizer, 1, seed=3)[0]
    caption = sample.prompt.removeprefix("<image>").removesuffix("\n")
    assert sample.prompt == f"<image>{caption}\n"
    bos = tokenizer.bos_token_id
    # preprocess_plain: [BOS, image] masked, then the caption and the separator.
    expected = [bos, IMAGE_TOKEN_INDEX] + _text_ids(tokenizer, caption + "\n")
    assert sample.input_ids.tolist() == expected
    assert sample.labels.tolist() == [IGNORE_INDEX, IGNORE_INDEX] + expected[2:]
    assert sample.pad_token_id == tokenizer.unk_token_id  # LLaVA: pad = unk


def test_plain_captions_are_tied_to_the_image(tokenizer):
    samples = plain_samples(tokenizer, 24, seed=0)
    by_caption: dict[str, set] = {}
    for s in samples:
        by_caption.setdefault(s.prompt, set()).add(s.image.getpixel((0, 0)))
    assert len(by_caption) > 3
    # One caption, one image pattern (its corner pixel), whatever the size.
    assert all(len(corners) == 1 for corners in by_caption.values())
    assert len({s.image.size for s in samples}) > 10


def test_vicuna_v1_prompt_is_the_conversation_template(tokenizer):
    turns = [("What is in the image?", "A cat."), ("What colour is it?", "It is red.")]
    prompt = "".join(text for text, _ in v1_segments(turns))
    assert prompt == (f"{V1_SYSTEM} USER: <image>\nWhat is in the image? ASSISTANT: A cat.</s>"
                      "USER: What colour is it? ASSISTANT: It is red.</s>")


def _loss_spans(ids: list[int], labels: list[int]) -> list[list[int]]:
    spans, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return spans + ([current] if current else [])


def test_vicuna_v1_loss_is_on_the_replies_only(tokenizer):
    samples = instruct_samples(tokenizer, 12, seed=0)
    assert {s.prompt.count("</s>") for s in samples} == {1, 2}  # one- and two-round samples
    for s in samples:
        ids, labels = s.input_ids.tolist(), s.labels.tolist()
        assert ids.count(IMAGE_TOKEN_INDEX) == 1
        replies = [part.split(" ASSISTANT: ")[1] + "</s>"
                   for part in s.prompt.split("</s>")[:-1]]
        spans = [tokenizer.decode(span) for span in _loss_spans(ids, labels)]
        assert spans == replies


def test_first_round_mask_agrees_with_preprocess_v1(tokenizer):
    """preprocess_v1 masks len(tokenizer_image_token(up to "ASSISTANT: ")) - 2 tokens after
    BOS in round one (the BOS and the trailing space's piece); ours must agree."""
    s = instruct_samples(tokenizer, 1, seed=5)[0]
    head = s.prompt.split(" ASSISTANT: ")[0] + " ASSISTANT: "
    instruction_len = len(tokenizer_image_token(head, tokenizer)) - 2
    labels = s.labels.tolist()
    assert labels[:1 + instruction_len] == [IGNORE_INDEX] * (1 + instruction_len)
    assert labels[1 + instruction_len] != IGNORE_INDEX


def test_an_unstable_label_boundary_is_an_error(tokenizer):
    # "ca" + "t" is one word: the prefix "ca" does not tokenize as the start of "cat".
    with pytest.raises(TrainError, match="tokenizes differently"):
        labelled(tokenizer, [("<image>a big ca", False), ("t\n", True)])


def test_samples_are_deterministic(tokenizer):
    a, b = plain_samples(tokenizer, 6, seed=1), plain_samples(tokenizer, 6, seed=1)
    assert all(torch.equal(x.input_ids, y.input_ids) and x.image.tobytes() == y.image.tobytes()
               for x, y in zip(a, b, strict=True))
    other = plain_samples(tokenizer, 6, seed=2)
    assert [s.prompt for s in a] != [s.prompt for s in other]


def test_collate_pads_right_like_llava(loaded):
    _, base = loaded(CHEAP)
    samples = instruct_samples(base.tokenizer, 4, seed=0)
    batch = collate(samples, base.image_processor, base.model.config)
    lengths = [len(s.input_ids) for s in samples]
    width = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == (4, width)
    pad = base.tokenizer.unk_token_id
    for row, (s, n) in enumerate(zip(samples, lengths, strict=True)):
        assert batch["input_ids"][row, :n].tolist() == s.input_ids.tolist()
        assert batch["input_ids"][row, n:].tolist() == [pad] * (width - n)
        assert batch["labels"][row, n:].tolist() == [IGNORE_INDEX] * (width - n)
        assert batch["attention_mask"][row].tolist() == [True] * n + [False] * (width - n)
    side = base.image_processor.crop_size["height"]
    assert batch["images"].shape == (4, 3, side, side)
    loss = base.model(**batch).loss
    assert torch.isfinite(loss)


def test_collate_cuts_at_the_model_max_length(loaded):
    _, base = loaded(CHEAP)
    config = copy.deepcopy(base.model.config)
    config.tokenizer_model_max_length = 5
    batch = collate(plain_samples(base.tokenizer, 2, 0), base.image_processor, config)
    assert batch["input_ids"].shape[1] == batch["labels"].shape[1] == 5


def test_caption_words_are_known_to_the_tokenizer(tokenizer):
    """Captions stay short: no caption word falls back to bytes."""
    for cls in range(8):
        pieces = tokenizer.convert_ids_to_tokens(_text_ids(tokenizer, caption_of(cls)))
        assert not any(p.startswith("<0x") for p in pieces), pieces

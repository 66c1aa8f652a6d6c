"""Stage 1 of LLaVA training (feature alignment) in miniature, and the checks that prove it.

What LLaVA's `train.py` does with `--tune_mm_mlp_adapter True`: `initialize_vision_modules`
builds a fresh projector; `model.requires_grad_(False)` freezes everything, then every
`mm_projector` parameter is made trainable again; the Trainer optimizes the parameters that
require grad (AdamW, lr 1e-3, cosine with 3% warmup) on `plain` image-caption pairs; and
`safe_save_model_for_hf_trainer` saves only the parameters whose name contains `mm_projector`
(`get_mm_adapter_state_maybe_zero_3`, names as `named_parameters()` gives them:
`model.mm_projector.*`) to `mm_projector.bin`, plus config.json.

The checks return lists of problems (empty: passed), so a test can show each one catching a
planted defect: the trainable count is the projector's; after training every other tensor is
bit-identical and every projector tensor changed; the loss fell; the saved file holds exactly
the projector.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint.atomic import atomic_dir
from ..model.projector import projector_type_of_config
from ..llava.projector import projector_params
from ..ops.counts import trainable_params
from .data import collate, plain_samples
from .loop import DEFAULT_LR, TrainError, batch_loss, train

PROJECTOR_MATCH = "mm_projector"  # LLaVA's `keys_to_match` when only the adapter is tuned
PROJECTOR_FILE = "mm_projector.bin"
CONFIG_FILE = "config.json"


def is_projector_key(name: str) -> bool:
    return PROJECTOR_MATCH in name


def _projector(model) -> torch.nn.Module:
    projector = getattr(model.get_model(), "mm_projector", None)
    if projector is None:
        raise TrainError("the model has no mm_projector (config.json names no vision tower)")
    return projector


def init_projector(model, seed: int = 0) -> None:
    """Re-initialise the projector as a freshly built one (PyTorch's default Linear init),
    which is where stage 1 starts: the base language model has no projector."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(seed)
        for module in _projector(model).modules():
            if isinstance(module, torch.nn.Linear):
                module.reset_parameters()


def freeze_for_stage1(model) -> None:
    """`tune_mm_mlp_adapter`: freeze the whole model, then unfreeze the projector."""
    model.requires_grad_(False)
    for p in _projector(model).parameters():
        p.requires_grad = True
    model.config.tune_mm_mlp_adapter = True


def expected_trainable(config) -> int:
    """The projector's parameter count from its formula (harness.ops.counts)."""
    return projector_params(projector_type_of_config(config), config.mm_hidden_size,
                            config.hidden_size)


def trainable_groups(model, lr: float = DEFAULT_LR) -> list[dict]:
    """What the Trainer optimizes: every parameter that requires grad, in one group."""
    return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]


def snapshot(model) -> dict[str, torch.Tensor]:
    """Every tensor of the model (parameters and buffers), copied."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def projector_state(model) -> dict[str, torch.Tensor]:
    """`get_mm_adapter_state_maybe_zero_3(model.named_parameters(), ['mm_projector'])`."""
    return {k: v.detach().cpu().clone() for k, v in model.named_parameters()
            if is_projector_key(k)}


def save_stage1(model, out: Path, force: bool = False) -> Path:
    """mm_projector.bin (projector parameters only) and config.json, atomically."""
    state = projector_state(model)
    if not state:
        raise TrainError("no mm_projector parameters to save (an identity projector has none)")
    out = Path(out)
    with atomic_dir(out, force) as tmp:
        model.config.use_cache = True  # LLaVA turns it back on before saving
        model.config.save_pretrained(tmp)
        torch.save(state, tmp / PROJECTOR_FILE)
    return out


# --- checks -----------------------------------------------------------------------------------

def freezing_problems(model, expected: int) -> list[str]:
    """Only projector parameters may require grad, all of them must, and their count must be
    `expected` (the formula's)."""
    problems = [f"{name} is trainable but not part of the projector"
                for name, p in model.named_parameters()
                if p.requires_grad and not is_projector_key(name)]
    problems += [f"{name} is part of the projector but frozen"
                 for name, p in model.named_parameters()
                 if not p.requires_grad and is_projector_key(name)]
    count = trainable_params(model)
    if count != expected:
        problems.append(f"{count} trainable parameters, expected {expected} (the projector's)")
    return problems


def update_problems(before: dict[str, torch.Tensor], model) -> list[str]:
    """After training: every non-projector tensor bit-identical to `before`, every projector
    tensor different from it."""
    after = model.state_dict()
    if set(after) != set(before):
        return [f"tensor names changed: {sorted(set(after) ^ set(before))[:3]}"]
    problems = []
    for name, old in before.items():
        same = torch.equal(old, after[name].to(old.device))
        if is_projector_key(name) and same:
            problems.append(f"{name} (projector) did not change")
        elif not is_projector_key(name) and not same:
            problems.append(f"{name} (frozen) changed")
    return problems


def saved_problems(folder: Path, model) -> list[str]:
    """mm_projector.bin holds exactly the model's projector tensors, under the model's own
    names, with the model's values; config.json is beside it."""
    folder = Path(folder)
    problems = [] if (folder / CONFIG_FILE).is_file() else [f"{folder}: no {CONFIG_FILE}"]
    saved = torch.load(folder / PROJECTOR_FILE, weights_only=True, map_location="cpu")
    expected = {k: v for k, v in model.state_dict().items() if is_projector_key(k)}
    problems += [f"{PROJECTOR_FILE} holds {k}, not a projector tensor of the model"
                 for k in sorted(set(saved) - set(expected))]
    problems += [f"{PROJECTOR_FILE} lacks {k}" for k in sorted(set(expected) - set(saved))]
    problems += [f"{PROJECTOR_FILE}: {k} differs from the model's"
                 for k in sorted(set(saved) & set(expected))
                 if not torch.equal(saved[k], expected[k].cpu())]
    return problems


def loss_problems(before: float, after: float, min_drop: float = 0.0) -> list[str]:
    """The held-out loss must fall by more than `min_drop`."""
    if before - after > min_drop:
        return []
    drop = before - after
    message = f"held-out loss fell by {drop:.6f} ({before:.6f} -> {after:.6f}), not more than "
    return [message + f"{min_drop}"]


# --- a run ------------------------------------------------------------------------------------

@dataclass
class Stage1Run:
    losses: list[float]           # training loss per step
    held_out_before: float        # loss on held-out samples before the first step
    held_out_after: float         # ... and after the last
    before: dict[str, torch.Tensor] = field(repr=False)  # every tensor before training


def train_stage1(model, tokenizer, image_processor, *, steps: int = 8, batch_size: int = 4,
                 seed: int = 0, lr: float = DEFAULT_LR, warmup_ratio: float = 0.03,
                 param_groups: list[dict] | None = None) -> Stage1Run:
    """Train an already frozen model (see `freeze_for_stage1`) on `plain` samples: `steps`
    batches of `batch_size`, then the loss on a held-out batch drawn with another seed.
    `param_groups` defaults to every parameter that requires grad (the Trainer's choice)."""
    config = model.config
    samples = plain_samples(tokenizer, steps * batch_size, seed)
    batches = [collate(samples[i:i + batch_size], image_processor, config)
               for i in range(0, len(samples), batch_size)]
    held_out = collate(plain_samples(tokenizer, 2 * batch_size, seed + 1), image_processor,
                       config)
    before = snapshot(model)
    loss_before = batch_loss(model, held_out)
    groups = trainable_groups(model, lr) if param_groups is None else param_groups
    losses = train(model, batches, groups, steps, warmup_ratio, lr=lr, seed=seed)
    model.eval()
    return Stage1Run(losses, loss_before, batch_loss(model, held_out), before)

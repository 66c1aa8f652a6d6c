"""A training loop with the optimizer and schedule LLaVA's runs get from the HF Trainer:
AdamW (betas 0.9/0.999, eps 1e-8, weight decay 0 as LLaVA's scripts set it), gradient norm
clipped at 1.0 (the Trainer's default), and a cosine schedule whose warmup is
ceil(warmup_ratio * steps) steps (`TrainingArguments.get_warmup_steps`).

As in the Trainer, the learning rate of the very first step is 0 whenever there is warmup
(the schedule's factor at step 0 is 0/warmup): the first step computes a loss and moves no
weight.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

import torch

from ..errors import HarnessError

DEFAULT_LR = 1e-3  # LLaVA's stage-1 learning rate
MAX_GRAD_NORM = 1.0


class TrainError(HarnessError):
    """The one error of harness/train/: bad samples, a model or run that cannot train."""


def warmup_steps(steps: int, warmup_ratio: float) -> int:
    return math.ceil(steps * warmup_ratio)


def _to_device(batch: dict, device) -> dict:
    def move(x):
        if isinstance(x, torch.Tensor):
            return x.to(device)
        if isinstance(x, list):
            return [move(v) for v in x]
        return x
    return {k: move(v) for k, v in batch.items()}


def _check_groups(param_groups: list[dict]) -> list[torch.nn.Parameter]:
    """Every parameter in a group must be trainable: a frozen one would get no gradient and
    silently stay as it was."""
    params = [p for group in param_groups for p in group["params"]]
    if not params:
        raise TrainError("no parameters to train (empty param_groups)")
    if len({id(p) for p in params}) != len(params):
        raise TrainError("a parameter appears in more than one param group")
    frozen = sum(not p.requires_grad for p in params)
    if frozen:
        raise TrainError(f"{frozen} parameter(s) in param_groups have requires_grad=False")
    return params


def make_optimizer(param_groups: list[dict], steps: int, warmup_ratio: float, lr: float,
                   weight_decay: float):
    from transformers import get_cosine_schedule_with_warmup  # heavy: transformers

    optimizer = torch.optim.AdamW(param_groups, lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup_steps(steps, warmup_ratio),
                                               steps)
    return optimizer, schedule


def train(model, batches: Iterable[dict], param_groups: list[dict], steps: int,
          warmup_ratio: float = 0.03, *, lr: float = DEFAULT_LR, weight_decay: float = 0.0,
          max_grad_norm: float | None = MAX_GRAD_NORM, seed: int = 0) -> list[float]:
    """`steps` optimizer steps, one batch each (the batches are cycled); returns each step's
    training loss. `param_groups` are torch optimizer groups (`{"params": [...], "lr": ...}`;
    a group without "lr" gets `lr`). Same seed, model and batches: the same losses and
    weights, bit for bit."""
    if not isinstance(steps, int) or steps < 1:
        raise TrainError(f"steps={steps!r}: need a positive integer")
    if not 0 <= warmup_ratio < 1:
        raise TrainError(f"warmup_ratio={warmup_ratio!r}: expected 0 <= ratio < 1")
    groups = [{**group, "params": list(group["params"])} for group in param_groups]
    params = _check_groups(groups)
    optimizer, schedule = make_optimizer(groups, steps, warmup_ratio, lr, weight_decay)
    torch.manual_seed(seed)  # dropout, should a model have any
    feed = itertools.cycle(batches)
    was_training = model.training
    model.train()
    losses: list[float] = []
    try:
        for step in range(steps):
            batch = next(feed, None)
            if batch is None:
                raise TrainError("no batches to train on")
            loss = model(**_to_device(batch, model.device)).loss
            if not torch.isfinite(loss):
                raise TrainError(f"step {step}: the loss is {loss.item()}")
            loss.backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    finally:
        model.train(was_training)
    return losses


@torch.no_grad()
def batch_loss(model, batch: dict) -> float:
    """The loss of one batch in eval mode, no gradients: for before/after comparisons."""
    was_training = model.training
    model.eval()
    try:
        return model(**_to_device(batch, model.device)).loss.item()
    finally:
        model.train(was_training)

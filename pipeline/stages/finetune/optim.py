"""The optimizer's policy: which parameters learn at which rate, and how the rate falls."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pipeline.ml.models import Layer
from pipeline.stages.finetune.options import FinetuneConfig


def param_groups(model: nn.Module, layers: list[Layer],
                 config: FinetuneConfig) -> list[dict[str, Any]]:
    """fc8 (new) at --lr; pretrained unfrozen layers at --lr x --lr-mult; no decay on biases."""
    pretrained_rate = config.lr if config.weights == "none" else config.lr * config.lr_mult
    fc8 = {id(p) for p in layers[-1].parameters()}
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        rate = config.lr if id(parameter) in fc8 else pretrained_rate
        decay = config.weight_decay if parameter.ndim > 1 else 0.0
        groups.setdefault((rate, decay), []).append(parameter)
    return [{"params": params, "lr": rate, "weight_decay": decay}
            for (rate, decay), params in groups.items()]


def make_optimizer(model: nn.Module, layers: list[Layer],
                   config: FinetuneConfig) -> torch.optim.SGD:
    # fused: decay, momentum and update in one pass per tensor; on a CPU the unfused
    # version's temporaries for fc6/fc7 (54M weights) cost more than their matmuls.
    return torch.optim.SGD(param_groups(model, layers, config), lr=config.lr,
                           momentum=config.momentum, fused=True)


def make_scheduler(optimizer: torch.optim.Optimizer, config: FinetuneConfig) -> Any:
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, config.epochs))
    if config.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=0.1, patience=config.plateau_patience)
    step = config.step_epochs or max(1, math.ceil(config.epochs / 3))
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step, gamma=0.1)


def step_scheduler(scheduler: Any, val_top1: float | None) -> None:
    """Once per epoch; plateau follows validation top-1 (options ensure there is one)."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(val_top1)
    else:
        scheduler.step()


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return max(group["lr"] for group in optimizer.param_groups)

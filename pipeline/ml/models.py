"""AlexNet / VGG from torchvision under their classic Caffe layer names, and freezing by name.

Users think in Caffe/Chainer names (`conv4`, `fc7`, `conv5_3`); torchvision numbers modules
inside `features` / `classifier`. `layer_table` is the one mapping between the two, used by
`--freeze-until`, `pipeline layers` and the fc8 replacement.
"""

from __future__ import annotations

import contextlib
import logging
import os
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from pipeline.core.errors import InputError
from pipeline.formats import checkpoint
from pipeline.formats.manifest import ClassRecord
from pipeline.ml.archs import ARCHS
from pipeline.ml.normalization import Normalization
from pipeline.ml.preprocess import InputSpec

log = logging.getLogger(__name__)

SCRATCH_INIT_GAIN = 0.7


@dataclass(frozen=True)
class Layer:
    """A named layer: its main module (conv or linear) plus any BatchNorm right after it."""

    name: str
    block: str
    modules: tuple[nn.Module, ...]

    def parameters(self) -> list[nn.Parameter]:
        return [p for module in self.modules for p in module.parameters()]


def check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise InputError(f"unknown --arch {arch!r}; choose one of: {', '.join(ARCHS)}")
    return arch


def layer_table(model: nn.Module, arch: str) -> list[Layer]:
    """Every conv and fc layer in forward order, under its classic name."""
    layers: list[Layer] = []
    block, index_in_block, conv_number = 1, 0, 0
    features = list(model.features)
    for position, module in enumerate(features):
        if isinstance(module, nn.MaxPool2d):
            block, index_in_block = block + 1, 0
        if not isinstance(module, nn.Conv2d):
            continue
        conv_number += 1
        index_in_block += 1
        following = features[position + 1] if position + 1 < len(features) else None
        group = (module, following) if isinstance(following, nn.BatchNorm2d) else (module,)
        if arch == "alexnet":
            name = f"conv{conv_number}"
            layers.append(Layer(name, name, group))
        else:
            layers.append(Layer(f"conv{block}_{index_in_block}", f"conv{block}", group))
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    for number, module in enumerate(linears, start=6):
        layers.append(Layer(f"fc{number}", f"fc{number}", (module,)))
    return layers


def layer_names(layers: list[Layer]) -> list[str]:
    """Valid --freeze-until names: every layer, plus VGG's block names (conv4 = conv4_*)."""
    names: list[str] = []
    for layer in layers:
        if layer.block != layer.name and layer.block not in names:
            names.append(layer.block)
        names.append(layer.name)
    return names


def frozen_layers(layers: list[Layer], until: str | None) -> list[Layer]:
    """`until` and every layer before it; a block name means its last layer."""
    if until is None or until == "none":
        return []
    matches = [i for i, layer in enumerate(layers) if until in (layer.name, layer.block)]
    if not matches:
        raise InputError(f"unknown layer {until!r} for --freeze-until; valid names: "
                         f"{', '.join(layer_names(layers))}")
    if layers[matches[-1]].name == "fc8":
        raise InputError("--freeze-until fc8 would leave nothing to train (fc8 is replaced "
                         "for your classes); freeze up to fc7 at most")
    return layers[: matches[-1] + 1]


def freeze(model: nn.Module, layers: list[Layer]) -> list[nn.Module]:
    """Stop gradients for `layers`; returns their BatchNorm modules, to be kept in eval mode."""
    batchnorms = []
    for layer in layers:
        for parameter in layer.parameters():
            parameter.requires_grad_(False)
        batchnorms.extend(m for m in layer.modules if isinstance(m, nn.BatchNorm2d))
    return batchnorms


def train_mode(model: nn.Module, frozen_batchnorms: list[nn.Module]) -> None:
    """model.train(), except that frozen BatchNorm keeps its running statistics fixed."""
    model.train()
    for module in frozen_batchnorms:
        module.eval()


@dataclass(frozen=True)
class LocalWeights:
    """A --weights file, read once: the state dict, and how its inputs were normalized when
    it is a checkpoint of ours (a torchvision .pth does not say)."""

    path: Path
    state: dict[str, torch.Tensor]
    normalization: Normalization | None


def resolve_weights(weights: str) -> str | LocalWeights:
    """"imagenet" and "none" stay names; anything else is a file, read here once."""
    return weights if weights in ("imagenet", "none") else read_local_weights(Path(weights))


def build_model(arch: str, num_classes: int,
                weights: str | LocalWeights = "imagenet") -> nn.Module:
    """A torchvision model with `weights` loaded and fc8 replaced for `num_classes`.

    `weights`: "imagenet" (torchvision's weights API and cache), "none", or a local file
    (our checkpoint or a torchvision .pth state dict), by path or already read.
    """
    check_arch(arch)
    if isinstance(weights, str):
        weights = resolve_weights(weights)
    if weights == "none":
        model = torchvision.models.get_model(arch, weights=None)
        if arch == "alexnet":
            he_initialize(model)
    elif weights == "imagenet":
        model = torchvision.models.get_model(arch, weights=None)
        model.load_state_dict(_imagenet_state_dict(arch))
    else:
        model = torchvision.models.get_model(
            arch, weights=None, num_classes=_fc8_outputs(weights.state, weights.path))
        try:
            model.load_state_dict(weights.state)
        except RuntimeError as exc:
            first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
            raise InputError(
                f"--weights {weights.path} does not fit --arch {arch}: {first}") from None
    replace_fc8(model, num_classes)
    return model


def he_initialize(model: nn.Module, gain: float = SCRATCH_INIT_GAIN) -> None:
    """He (fan-in) initialization for training AlexNet from scratch.

    torchvision's AlexNet keeps PyTorch's default init, under which a from-scratch AlexNet
    barely moves for many epochs (the signal fades through fc6/fc7); torchvision's VGG already
    uses a He-style init. The 0.7 gain keeps the first steps of plain SGD from diverging.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            module.weight.data.mul_(gain)
            nn.init.zeros_(module.bias)


def replace_fc8(model: nn.Module, num_classes: int) -> None:
    old = model.classifier[6]
    model.classifier[6] = nn.Linear(old.in_features, num_classes)


def imagenet_weights_file(arch: str) -> Path:
    """Where torchvision keeps (or would download) this architecture's ImageNet weights."""
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def _imagenet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        target = imagenet_weights_file(arch)
        raise InputError(
            f"cannot get ImageNet weights for {arch} ({exc}); offline, download "
            f"{weights.url} elsewhere and place it at {target} (the cache under $TORCH_HOME, "
            "default ~/.cache/torch), or pass --weights PATH or --weights none") from None


def read_local_weights(path: Path) -> LocalWeights:
    if not path.is_file():
        raise InputError(f"--weights {path}: no such file (use imagenet, none or a .pt/.pth)")
    loaded = checkpoint.read_torch_file(path, "--weights")
    state = loaded.get("model", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"--weights {path} holds no state dict (expected a checkpoint from "
                         "`pipeline finetune` or a torchvision .pth)")
    normalization = (Normalization.from_state(loaded["normalization"])
                     if checkpoint.is_checkpoint(loaded) else None)
    return LocalWeights(path, state, normalization)


@dataclass
class Inference:
    """What evaluate and predict need, all taken from one checkpoint."""

    model: nn.Module
    spec: InputSpec
    normalization: Normalization
    classes: list[ClassRecord]


def inference_from(path: Path, device: torch.device) -> Inference:
    payload = checkpoint.load(path)
    model = torchvision.models.get_model(payload["arch"], weights=None)
    replace_fc8(model, len(payload["classes"]))
    model.load_state_dict(payload["model"])
    model.to(device).eval()
    return Inference(model, InputSpec.from_state(payload["input"]),
                     Normalization.from_state(payload["normalization"]),
                     checkpoint.classes_from(payload["classes"]))


def _fc8_outputs(state: dict[str, torch.Tensor], source: Path) -> int:
    weight = state.get("classifier.6.weight")
    if weight is None:
        raise InputError(f"--weights {source} has no classifier.6 (fc8) layer; is it an "
                         "AlexNet/VGG state dict?")
    return int(weight.shape[0])


def describe_layers(arch: str, freeze_until: str | None = None) -> list[list[str]]:
    """Rows for `pipeline layers`: name, torchvision module, parameters, frozen?"""
    model = torchvision.models.get_model(check_arch(arch), weights=None)
    layers = layer_table(model, arch)
    frozen = {layer.name for layer in frozen_layers(layers, freeze_until)}
    module_names = {id(m): n for n, m in model.named_modules()}
    rows = [["layer", "module", "params", "frozen"]]
    for layer in layers:
        params = sum(p.numel() for p in layer.parameters())
        rows.append([layer.name, " + ".join(module_names[id(m)] for m in layer.modules),
                     f"{params:,}", "yes" if layer.name in frozen else ""])
    return rows


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast, or nothing for fp32 (`--precision` of finetune and predict)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)

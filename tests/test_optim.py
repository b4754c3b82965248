"""The optimizer's parameter groups: which parameters learn at which rate, and which decay."""

from pathlib import Path

import pytest
from torch import nn

from pipeline.ml.models import Layer, build_model, freeze, frozen_layers, layer_table
from pipeline.stages.finetune.optim import param_groups
from pipeline.stages.finetune.options import FinetuneConfig


@pytest.fixture(scope="module")
def alexnet() -> tuple[nn.Module, list[Layer]]:
    """conv1-conv4 frozen, as by default; built once (AlexNet is 61M parameters)."""
    model = build_model("alexnet", 3, "none")
    layers = layer_table(model, "alexnet")
    freeze(model, frozen_layers(layers, "conv4"))
    return model, layers


def groups_by_id(model: nn.Module, layers: list[Layer], **options) -> dict[int, dict]:
    """Each parameter's group (by id), for the config's options."""
    config = FinetuneConfig(train=Path("."), lr=0.01, lr_mult=0.1, weight_decay=5e-4, **options)
    return {id(p): group for group in param_groups(model, layers, config)
            for p in group["params"]}


def test_fc8_learns_at_lr_and_pretrained_layers_at_lr_times_lr_mult(alexnet):
    model, layers = alexnet
    groups = groups_by_id(model, layers, weights="imagenet")
    by_name = {layer.name: layer for layer in layers}
    assert {groups[id(p)]["lr"] for p in by_name["fc8"].parameters()} == {0.01}
    for name in ("conv5", "fc6", "fc7"):
        rates = [groups[id(p)]["lr"] for p in by_name[name].parameters()]
        assert rates == pytest.approx([0.01 * 0.1] * 2), name


def test_from_scratch_every_layer_learns_at_lr(alexnet):
    model, layers = alexnet
    groups = groups_by_id(model, layers, weights="none")
    assert {group["lr"] for group in groups.values()} == {0.01}


def test_weights_decay_and_biases_do_not(alexnet):
    model, layers = alexnet
    groups = groups_by_id(model, layers, weights="imagenet")
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            expected = 5e-4 if name.endswith("weight") else 0.0
            assert groups[id(parameter)]["weight_decay"] == expected, name


def test_frozen_layers_are_in_no_group_and_every_trainable_one_is_in_exactly_one(alexnet):
    model, layers = alexnet
    config = FinetuneConfig(train=Path("."))
    grouped = [id(p) for group in param_groups(model, layers, config) for p in group["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable)
    frozen = {id(p) for layer in frozen_layers(layers, "conv4") for p in layer.parameters()}
    assert frozen and not frozen & set(grouped)

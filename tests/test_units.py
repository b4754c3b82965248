"""Fast unit tests of the pure pieces: the epoch sampler, InputSpec and the layer names."""

import random

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from pipeline.ml.archs import ARCHS
from pipeline.ml.data import EpochSampler
from pipeline.ml.models import layer_names, layer_table
from pipeline.ml.preprocess import InputSpec


def test_epoch_sampler_is_a_function_of_seed_and_epoch():
    a, b = EpochSampler(10, shuffle=True, seed=3), EpochSampler(10, shuffle=True, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    assert sorted(index for index, _ in a) == list(range(10))
    b.set_epoch(3)
    assert [i for i, _ in a] != [i for i, _ in b]
    assert {epoch for _, epoch in b} == {3}


def test_epoch_sampler_pads_every_rank_to_the_same_length():
    shards = [list(EpochSampler(10, shuffle=True, seed=0, rank=r, world=3)) for r in range(3)]
    assert [len(shard) for shard in shards] == [4, 4, 4]
    seen = [index for shard in shards for index, _ in shard]
    assert set(seen) == set(range(10)) and len(seen) == 12  # two wrapped around


def test_input_spec_crops_and_flips_reproducibly():
    spec = InputSpec(crop=32, resize=40)
    # x in red, y in green: every window and every flip gives other pixels
    pixels = np.zeros((60, 80, 3), np.uint8)
    pixels[..., 0] = np.linspace(0, 255, 80).astype(np.uint8)[None, :]
    pixels[..., 1] = np.linspace(0, 255, 60).astype(np.uint8)[:, None]
    image = Image.fromarray(pixels)
    centre = spec.eval_pixels(image)
    assert centre.shape == (32, 32, 3)
    assert abs(centre[..., 0].mean() - 127.5) < 8 and abs(centre[..., 1].mean() - 127.5) < 8
    crops = [spec.train_pixels(image, random.Random(seed)) for seed in range(20)]
    assert (crops[1] == spec.train_pixels(image, random.Random(1))).all()
    assert len({crop.tobytes() for crop in crops}) > 10  # the window moves
    mirrored = [crop for crop in crops if crop[0, 0, 0] > crop[0, -1, 0]]
    assert 0 < len(mirrored) < len(crops)  # some flipped, some not
    assert InputSpec(crop=32, resize=40, jitter=(40, 64)).decode_side == 64


@pytest.mark.parametrize("arch", [a for a in ARCHS if a.startswith("vgg")])
def test_every_vgg_has_classic_block_and_layer_names(arch):
    with torch.device("meta"):  # the structure only: no memory, no weight init
        model = torchvision.models.get_model(arch, weights=None)
    names = layer_names(layer_table(model, arch))
    assert names[:2] == ["conv1", "conv1_1"]
    assert {"conv5", "fc6", "fc7", "fc8"} <= set(names)
    depth = int(arch[3:5])
    assert sum(1 for n in names if "_" in n) == depth - 3  # VGG-N: N-3 conv layers

"""Fast unit tests of the pure pieces: the epoch sampler, InputSpec and the layer names."""

import random
import subprocess
import sys

import pytest
import torch
import torchvision
from PIL import Image

from pipeline.archs import ARCHS
from pipeline.data import EpochSampler
from pipeline.models import layer_names, layer_table
from pipeline.preprocess import InputSpec


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
    image = Image.new("RGB", (80, 60), (10, 20, 30))
    assert spec.eval_pixels(image).shape == (32, 32, 3)
    first = spec.train_pixels(image, random.Random(1))
    assert (first == spec.train_pixels(image, random.Random(1))).all()
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


ONE_STEP = """
import resource, sys, torch
from pipeline.allocator import keep_freed_memory
if sys.argv[1] == "tuned" and not keep_freed_memory():
    print("not glibc"); sys.exit()
def minor_faults_of_one_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(40 * 2**20, dtype=torch.float32).sum()  # 160 MB, freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
minor_faults_of_one_step()
print(minor_faults_of_one_step())
"""


def test_the_allocator_keeps_freed_memory_for_the_next_step():
    """A block as big as AlexNet's fc6 gradient is reused, not unmapped and faulted in again.

    Measured in a fresh process, as `pipeline finetune` starts: a long-lived interpreter whose
    heap cannot grow in place gets big blocks from mmap whatever the settings.
    """
    def faults(mode: str) -> str:
        return subprocess.run([sys.executable, "-c", ONE_STEP, mode], capture_output=True,
                              text=True, check=True, timeout=120).stdout.strip()

    tuned = faults("tuned")
    if tuned == "not glibc":
        pytest.skip("not glibc")
    assert int(tuned) < 1000 < int(faults("default"))  # default: ~40,000 pages each step

"""Normalization.from_mean_file: a `pipeline mean` output, brought to the crop, never guessed."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.errors import InputError
from pipeline.ml.normalization import Normalization
from pipeline.ml.preprocess import InputSpec

SPEC = InputSpec(crop=8, resize=10)
STD = [60.0, 61.0, 62.0]


def write_mean(folder: Path, image: np.ndarray, stats: dict | None = None) -> Path:
    """mean.npy and, unless stats is None, mean.json beside it, as `pipeline mean` writes."""
    npy = folder / "mean.npy"
    np.save(npy, image)
    if stats is not None:
        npy.with_suffix(".json").write_text(json.dumps(stats))
    return npy


def test_a_mean_file_gives_a_crop_sized_mean_image_and_its_own_std(tmp_path):
    image = np.full((10, 10, 3), (100.0, 120.0, 140.0), dtype=np.float32)
    normalization = Normalization.from_mean_file(write_mean(tmp_path, image, {"std": STD}), SPEC)
    assert normalization.kind == "mean_image"
    assert normalization.mean.shape == (3, 8, 8)
    assert torch.allclose(normalization.mean[:, 0, 0], torch.tensor([100.0, 120.0, 140.0]))
    assert torch.equal(normalization.std.flatten(), torch.tensor(STD))
    pixels = torch.full((1, 3, 8, 8), 160, dtype=torch.uint8)
    assert torch.allclose(normalization(pixels)[0, :, 0, 0],
                          torch.tensor([60 / 60, 40 / 61, 20 / 62]))


def test_a_mean_image_of_another_size_is_resized_then_center_cropped(tmp_path):
    image = np.zeros((20, 20, 3), dtype=np.float32)
    image[5:15, 5:15] = 200.0  # the centre half: what a 10-pixel resize keeps in its crop
    normalization = Normalization.from_mean_file(write_mean(tmp_path, image, {"std": STD}), SPEC)
    assert normalization.mean.shape == (3, 8, 8)
    assert float(normalization.mean[:, 3:5, 3:5].min()) == pytest.approx(200.0)


def test_a_missing_mean_json_is_an_error_not_a_std_of_one(tmp_path):
    path = write_mean(tmp_path, np.zeros((10, 10, 3), dtype=np.float32))
    with pytest.raises(InputError, match="mean.json are missing or unreadable"):
        Normalization.from_mean_file(path, SPEC)


@pytest.mark.parametrize("stats", [{}, {"std": [1.0, 2.0]}, {"std": "wide"}])
def test_unusable_statistics_are_an_error(tmp_path, stats):
    path = write_mean(tmp_path, np.zeros((10, 10, 3), dtype=np.float32), stats)
    with pytest.raises(InputError, match="missing or unreadable"):
        Normalization.from_mean_file(path, SPEC)


@pytest.mark.parametrize("shape", [(10, 10), (10, 10, 4), (3, 10, 10), (1, 10, 10, 3)])
def test_a_mean_image_of_the_wrong_shape_is_an_error(tmp_path, shape):
    path = write_mean(tmp_path, np.zeros(shape, dtype=np.float32), {"std": STD})
    with pytest.raises(InputError, match="expected H x W x 3"):
        Normalization.from_mean_file(path, SPEC)


def test_a_file_that_is_no_array_is_an_error(tmp_path):
    path = tmp_path / "mean.npy"
    path.write_text("not an array")
    with pytest.raises(InputError, match="not a mean image"):
        Normalization.from_mean_file(path, SPEC)


def test_an_npz_archive_is_an_error(tmp_path):
    path = tmp_path / "mean.npy"
    with open(path, "wb") as handle:
        np.savez(handle, mean=np.zeros((10, 10, 3)))
    with pytest.raises(InputError, match="expected H x W x 3"):
        Normalization.from_mean_file(path, SPEC)

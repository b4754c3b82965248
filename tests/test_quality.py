"""Quality flags (pipeline/core/quality.py): the thresholds hold on real photographs and their
degraded copies, label writes quality.csv from the same decode as its hashes, and
--drop-quality leaves flagged images out of the manifests without deleting them."""

import csv
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from pipeline.core import quality
from pipeline.core.images import decode_image
from pipeline.formats.manifest import QUALITY_HEADER, read_manifest
from pipeline.stages import label as label_stage
from pipeline.stages.label import label
from pipeline.testing import pictures

COLOURFUL = ("astronaut", "chelsea", "coffee", "rocket", "retina", "immunohistochemistry")


def flags_of(image: Image.Image) -> list[str]:
    decoded = decode_image(pictures.jpeg(image), min_side=quality.QUALITY_SIDE)
    return quality.measure(decoded).flags()


@pytest.fixture(scope="module")
def photos():
    return pictures.photographs()


def test_a_well_exposed_sharp_colourful_photo_carries_no_flag(photos):
    assert {name: flags_of(photos[name]) for name in COLOURFUL} == {
        name: [] for name in COLOURFUL}


def test_each_degradation_raises_its_flag(photos):
    for name in COLOURFUL:
        photo = photos[name]
        radius = max(photo.size) / 128 * 2  # 2 px at the size the flags are measured at
        assert flags_of(ImageEnhance.Brightness(photo).enhance(0.2)) == ["dark"], name
        washed = Image.blend(photo, Image.new("RGB", photo.size, "white"), 0.75)
        assert flags_of(washed) == ["bright"], name
        assert flags_of(photo.filter(ImageFilter.GaussianBlur(radius))) == ["blurry"], name
        assert flags_of(photo.convert("L")) == ["grayscale"], name
        width, height = photo.size
        assert flags_of(photo.crop((0, 0, width, width // 3))) == ["odd_aspect"], name
    rng = np.random.default_rng(3)
    for make in (pictures.flat_field, pictures.text_card, pictures.product_shot):
        assert "low_information" in flags_of(make(rng))


@pytest.fixture()
def dataset(tmp_path, photos):
    """Two classes of real photographs, one of each class darkened, one blurred."""
    root = tmp_path / "raw"
    for klass, names in (("n1", COLOURFUL[:3]), ("n2", COLOURFUL[3:])):
        (root / klass).mkdir(parents=True)
        for name in names:
            (root / klass / f"{name}.jpg").write_bytes(pictures.jpeg(photos[name]))
    dark = ImageEnhance.Brightness(photos["coffee"]).enhance(0.2)
    (root / "n1" / "dark.jpg").write_bytes(pictures.jpeg(dark))
    retina = photos["retina"]
    blurred = retina.filter(ImageFilter.GaussianBlur(max(retina.size) / 128 * 3))
    (root / "n2" / "blurred.jpg").write_bytes(pictures.jpeg(blurred))
    return root


def test_label_writes_quality_csv_and_drops_only_what_it_is_asked_to(dataset, tmp_path):
    out = tmp_path / "m"
    report = label(dataset, out, val_ratio=0.3, drop_quality=("dark",))
    with open(out / "quality.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == QUALITY_HEADER and len(rows) == 8
    flags = {row["path"]: row["flags"] for row in rows}
    assert flags["n1/dark.jpg"] == "dark" and flags["n2/blurred.jpg"] == "blurry"
    assert all(flags[f"n1/{name}.jpg"] == "" for name in COLOURFUL[:3])
    assert {row["path"] for row in rows if row["dropped"] == "yes"} == {"n1/dark.jpg"}
    listed = {str(path) for split in ("train", "val")
              for path in read_manifest(out / f"{split}.txt").paths}
    assert "n1/dark.jpg" not in listed and "n2/blurred.jpg" in listed and len(listed) == 7
    assert (dataset / "n1" / "dark.jpg").exists()  # never deleted
    assert report.quality_dropped == 1 and report.quality_flags == {"dark": 1, "blurry": 1}


def test_the_flags_come_from_the_hashing_decode(dataset, tmp_path, monkeypatch):
    decoded = []

    def counting(source, **kwargs):
        decoded.append(1)
        return decode_image(source, **kwargs)

    monkeypatch.setattr(label_stage, "decode_image", counting)
    label(dataset, tmp_path / "m", workers=1)
    assert len(decoded) == 8  # one decode per image: hashes and flags both


def test_an_unknown_flag_is_one_line(dataset, tmp_path):
    done = subprocess.run([sys.executable, "-m", "pipeline", "label", str(dataset), "--out",
                           str(tmp_path / "m"), "--drop-quality", "dark,fuzzy"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: --drop-quality: unknown quality flag(s) fuzzy; one of dark, bright, blurry, "
        "low_information, odd_aspect, grayscale"]

"""label's near-duplicates on real files: copies never straddle the split, cross-class copies
are resolved and listed, different images are not grouped (the synthetic sample's similar
figures are the hard negatives)."""

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from pipeline.core import perceptual
from pipeline.core.images import decode_image
from pipeline.core.perceptual import (
    COLOUR_BYTES,
    HashTable,
    Signature,
    components,
    hash_image,
    near_pairs,
)
from pipeline.formats.manifest import read_conflicts, read_duplicates, read_manifest
from pipeline.stages.label import label
from pipeline.testing import pictures

ORIGINALS = 12  # per class, copied into the dataset with their near-copies


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def near_copies(path: Path) -> dict[str, bytes]:
    """The copies the web makes of a photo: re-encoded, rescaled, cropped, bordered."""
    image = decode_image(path)  # as training sees it (alpha on white, EXIF orientation)
    width, height = image.size
    dx, dy = round(width * 0.015), round(height * 0.015)
    border = round(min(width, height) * 0.05)
    return {"q60": jpeg(image, 60),
            "half": jpeg(image.resize((width // 2, height // 2), Image.LANCZOS)),
            "crop": jpeg(image.crop((dx, dy, width - dx, height - dy))),
            "border": jpeg(ImageOps.expand(image, border, fill=(255, 255, 255)))}


@pytest.fixture()
def dataset(sample, tmp_path):
    """Sample images per class; originals 0-3 get near-copies in their own class, original 4
    of the first class one in the second class (a cross-class conflict)."""
    root = tmp_path / "raw"
    classes = sorted(p.name for p in (sample / "files").iterdir())
    for klass in classes:
        (root / klass).mkdir(parents=True)
        for path in sorted((sample / "files" / klass).iterdir())[:ORIGINALS]:
            shutil.copy(path, root / klass / path.name)
    originals = {klass: sorted((root / klass).iterdir()) for klass in classes}
    planted = {}
    for klass in classes:
        for original in originals[klass][:4]:
            for kind, data in near_copies(original).items():
                (root / klass / f"{original.stem}_{kind}.jpg").write_bytes(data)
            planted[f"{klass}/{original.name}"] = {f"{klass}/{original.stem}_{k}.jpg"
                                                   for k in ("q60", "half", "crop", "border")}
    stray = originals[classes[0]][4]
    (root / classes[1] / "stray_q60.jpg").write_bytes(near_copies(stray)["q60"])
    return root, classes, planted, (f"{classes[0]}/{stray.name}", f"{classes[1]}/stray_q60.jpg")


def sides(manifests: Path) -> dict[str, str]:
    return {path: side for side in ("train", "val")
            for path in read_manifest(manifests / f"{side}.txt").paths.tolist()}


def test_near_copies_are_grouped_and_never_straddle_the_split(dataset, tmp_path):
    root, classes, planted, stray = dataset
    report = label(root, tmp_path / "m", val_ratio=0.3, seed=0)
    groups = {frozenset(g.paths): g.how for g in read_duplicates(tmp_path / "m")}
    for original, copies in planted.items():
        assert groups.get(frozenset({original, *copies})) == "perceptual", original
    assert set(groups) - {frozenset({original, *c}) for original, c in planted.items()} == {
        frozenset(stray)}  # nothing else: different images are never grouped
    side = sides(tmp_path / "m")
    for group in groups:
        assert len({side.get(path) for path in group}) == 1  # one side, or left out
    assert report.cross_class_groups == 1 and report.cross_class_dropped == 2
    assert not set(stray) & set(side)  # --cross-class drop: out of both classes...
    assert all((root / path).exists() for path in stray)  # ...and still on disk
    rows = read_conflicts(tmp_path / "m")
    assert {(r["class"], r["path"], r["action"]) for r in rows} == {
        (classes[0], stray[0], "dropped"), (classes[1], stray[1], "dropped")}


@pytest.mark.parametrize("policy, kept", [("first", {0}), ("keep", {0, 1})])
def test_cross_class_first_or_keep(dataset, tmp_path, policy, kept):
    root, classes, _, stray = dataset
    label(root, tmp_path / "m", val_ratio=0.3, cross_class=policy)
    side = sides(tmp_path / "m")
    assert {i for i, path in enumerate(stray) if path in side} == kept
    assert len({side[path] for path in stray if path in side}) == 1
    actions = {r["path"]: r["action"] for r in read_conflicts(tmp_path / "m")}
    assert actions == {path: "kept" if i in kept else "dropped" for i, path in enumerate(stray)}


def test_hashes_are_cached_by_size_and_mtime_and_bytes_only_turns_perceptual_off(dataset,
                                                                               tmp_path):
    root, *_ = dataset
    first = label(root, tmp_path / "m", workers=2)
    assert first.hashed == len([p for p in root.rglob("*.*") if not p.name.startswith(".")])
    again = label(root, tmp_path / "m")
    assert again.hashed == 0 and again.duplicate_groups == first.duplicate_groups
    bytes_only = label(root, tmp_path / "b", near_distance=0)
    assert bytes_only.duplicate_groups == 0 and bytes_only.cross_class_groups == 0


def test_different_sample_images_are_not_grouped(sample):
    """The false-positive check on every image of the sample: similar figures, one per file."""
    from pipeline.core.perceptual import hash_image

    files = sorted((sample / "files").rglob("*.*"))
    table = HashTable(hash_image(path) for path in files)
    assert near_pairs(table, 10, 64) == set()
    assert components(len(files), []) == []


def test_grouping_matches_brute_force_on_random_hashes():
    rng = np.random.default_rng(1)
    coarse = rng.integers(0, 2**62, 3000, dtype=np.uint64)
    coarse[1500:] = coarse[:1500] ^ (np.uint64(1) << rng.integers(0, 63, 1500).astype(np.uint64))
    coarse[2000:2100] ^= np.uint64(0b111111111) << np.uint64(20)  # 9-10 bits away, 2 blocks
    flat = bytes(COLOUR_BYTES)  # one colour, plenty of structure: the hashes decide
    views = [[Signature((int(c), (0, 0, 0, 0)), flat, 50.0)] for c in coarse]
    found = near_pairs(HashTable(views), 10, 64)
    distance = np.bitwise_count(coarse[:, None] ^ coarse[None, :])
    brute = {(int(i), int(j)) for i, j in zip(*np.nonzero(distance <= 10), strict=True) if i < j}
    assert found == brute and len(brute) >= 1500


@pytest.mark.slow
def test_cli_label_options_and_a_bad_choice_is_one_line(dataset, tmp_path):
    root, *_ = dataset
    done = subprocess.run([sys.executable, "-m", "pipeline", "label", str(root), "--out",
                           str(tmp_path / "m"), "--cross-class", "first", "--workers", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "1 group(s) of copies across classes" in done.stdout
    done = subprocess.run([sys.executable, "-m", "pipeline", "label", str(root),
                           "--cross-class", "both"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1


def test_report_shows_the_data_quality_the_stages_wrote(dataset, tmp_path):
    from pipeline.stages.report import build_report

    root, classes, _, stray = dataset
    label(root, tmp_path / "m", val_ratio=0.3)
    (root / "placeholders.txt").write_text("ab" * 32 + "\n")
    (root / "hyponym_conflicts.txt").write_text(
        "synset\tclasses\turls\tresolution\nn01323068\tn01322685,n02129604\t3\tdropped\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(f'{{"train": "{tmp_path / "m" / "train.txt"}"}}')
    (run / "log.csv").write_text("epoch,train_loss,train_top1\n1,1.0,0.5\n")
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    page = build_report(run).read_text()
    assert "Data quality" in page and "n01323068" in page and stray[1] in page
    assert "13 group(s) of copies" in page and "1 placeholder body(ies) listed" in page
    assert (run / "duplicates.png").exists()
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before  # only read


# -- precision on pictures with little in them, and copies of real photographs
# (scripts/bench/dedup.py --precision measures the same on more of them; seed 7 here is held
# out: the thresholds were set on seed 0)


def test_distinct_pictures_with_little_in_them_are_never_copies(monkeypatch):
    negatives = pictures.hard_negatives(60, seed=7)
    views = [hash_image(data) for kind in negatives.values() for data in kind]
    views += [hash_image(data) for data in pictures.tiles(pictures.photographs())]
    table = HashTable(views)
    assert near_pairs(table, 10, 64) == set()
    # the set is hard: the grey-level hashes alone call dozens of these pairs copies
    monkeypatch.setattr(perceptual, "COLOUR_WORST", 255)
    monkeypatch.setattr(perceptual, "COLOUR_MEAN", 255)
    monkeypatch.setattr(perceptual, "FLAT_STRUCTURE", 0)
    assert len(near_pairs(table, 10, 64)) > 20


def test_copies_of_real_photographs_are_found():
    missed = []
    for name, photo in pictures.photographs().items():
        original = hash_image(pictures.jpeg(photo, 95))
        for how, data in pictures.copies(photo).items():
            if not near_pairs(HashTable([original, hash_image(data)]), 10, 64):
                missed.append((name, how))
    # a brick wall cropped 3% moves its grey-level hash 18 bits (the hashes alone miss it too)
    assert missed == [("brick", "cropped 3%")]


def test_label_reads_a_read_only_dataset_and_writes_nothing_into_it(dataset, tmp_path):
    root, *_ = dataset
    before = sorted(path.relative_to(root) for path in root.rglob("*"))
    script = (f"mount --bind {root} {root} && mount -o remount,bind,ro {root} && "
              f"touch {root}/probe 2>/dev/null && exit 3; "
              f"{sys.executable} -m pipeline -q label {root} --out {tmp_path / 'm'}")
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True,
                          text=True, timeout=300)
    if done.returncode != 0 and "unshare" in done.stderr:
        pytest.skip("no mount namespace here: " + done.stderr.strip())
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(path.relative_to(root) for path in root.rglob("*")) == before
    assert (tmp_path / "m" / ".label-cache.json").exists()
    assert len(read_manifest(tmp_path / "m" / "train.txt")) > 0


def test_the_hash_cache_lives_with_the_outputs_keyed_by_absolute_path(dataset, tmp_path):
    root, *_ = dataset
    first = label(root, tmp_path / "m")
    cache = json.loads((tmp_path / "m" / ".label-cache.json").read_text())
    assert all(Path(key).is_absolute() and Path(key).is_file() for key in cache["images"])
    assert not list(root.glob(".label*"))
    shared = tmp_path / "shared-cache"
    assert label(root, tmp_path / "other", cache_dir=shared).hashed == first.hashed
    assert label(root, tmp_path / "third", cache_dir=shared).hashed == 0
    image = next(path for path in sorted(root.rglob("*.jpg")))
    image.write_bytes(image.read_bytes() + b"\0")  # changed: hashed again, alone
    assert label(root, tmp_path / "m").hashed == 1

"""validate, label, mean and pack on real image files."""

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from pipeline.core.errors import InputError
from pipeline.core.fsutil import atomic_link, atomic_write_bytes
from pipeline.formats.manifest import read_labels, read_manifest, write_manifest
from pipeline.ml.preprocess import load_square
from pipeline.stages.label import label
from pipeline.stages.mean import compute_mean
from pipeline.stages.pack import pack
from pipeline.stages.validate import ValidateOptions, validate

from imagefiles import encoded, make_dataset, pattern, write_image


def add_broken_files(root: Path) -> dict[str, str]:
    """One of each kind of unusable file, in class folders: relative path -> reason."""
    cls = root / "n00000001"
    good = encoded(pattern(7, (120, 120)))
    (cls / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (cls / "empty.jpg").write_bytes(b"")
    (cls / "page.jpg").write_bytes(b"<!DOCTYPE html><html><body>Not found</body></html>")
    (cls / "notes.txt").write_text("not an image")
    write_image(cls / "tiny.png", 1, "PNG", size=(8, 8))
    return {"n00000001/truncated.jpg": "truncated", "n00000001/empty.jpg": "empty",
            "n00000001/page.jpg": "not_image", "n00000001/notes.txt": "not_image",
            "n00000001/tiny.png": "too_small"}


def options(tmp_path: Path, workers: int = 2) -> ValidateOptions:
    return ValidateOptions(quarantine=tmp_path / "rejected", report=tmp_path / "validate.jsonl",
                           min_size=32, workers=workers)


@pytest.mark.parametrize("workers", [1, 2])
def test_validate_moves_every_broken_file_with_its_reason(tmp_path, workers):
    root = tmp_path / "raw"
    make_dataset(root)
    broken = add_broken_files(root)
    report = validate(root, options(tmp_path, workers))
    assert sum(report.seen.values()) == 35
    assert sum(report.kept.values()) + report.total_rejected == sum(report.seen.values())
    assert report.total_rejected == len(broken)
    records = [json.loads(line) for line in (tmp_path / "validate.jsonl").read_text().splitlines()]
    assert {r["path"]: r["reason"] for r in records} == broken
    for relative in broken:
        assert not (root / relative).exists()
        assert (tmp_path / "rejected" / relative).exists()  # moved, never deleted
    for path in root.rglob("*.*"):
        if not path.name.startswith("."):
            load_square(path, 32)  # everything left decodes


def test_validate_rerun_is_cheap_and_idempotent(tmp_path):
    root = tmp_path / "raw"
    make_dataset(root)
    add_broken_files(root)
    validate(root, options(tmp_path))
    again = validate(root, options(tmp_path))
    assert again.skipped == 30 and again.total_rejected == 0
    target = root / "n00000002" / "n00000002_0.jpg"
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 3])  # changed since: decoded again, and rejected
    third = validate(root, options(tmp_path))
    assert third.skipped == 29 and third.total_rejected == 1
    assert (tmp_path / "rejected" / "n00000002" / "n00000002_0.jpg").exists()


def test_validate_keeps_both_copies_when_quarantining_the_same_name_twice(tmp_path):
    root = tmp_path / "raw"
    make_dataset(root, classes=2, per_class=2)
    for _ in range(2):
        (root / "n00000001" / "bad.jpg").write_bytes(b"junk")
        validate(root, options(tmp_path))
    assert sorted(p.name for p in (tmp_path / "rejected" / "n00000001").iterdir()) == [
        "bad.jpg", "bad.jpg.1"]


def test_label_split_is_stratified_deterministic_and_atomic(tmp_path):
    root = tmp_path / "raw"
    made = make_dataset(root, classes=3, per_class=20)
    write_image(root / "n00000002" / "nested" / "deep one é.jpg", 99)  # nested, space, unicode
    (root / "n00000003" / "README").write_text("ignored")
    out = tmp_path / "manifests"
    report = label(root, out, val_ratio=0.25, seed=3, words=None)
    assert report.ignored == 1
    first = {name: (out / name).read_bytes() for name in ("train.txt", "val.txt", "labels.txt")}
    label(root, out, val_ratio=0.25, seed=3, words=None)
    assert first == {name: (out / name).read_bytes() for name in first}
    train, val = read_manifest(out / "train.txt"), read_manifest(out / "val.txt")
    assert len(train) + len(val) == 61
    for cls in range(3):
        assert (val.labels == cls).sum() == 5
    assert "n00000002/nested/deep one é.jpg" in set(train.paths) | set(val.paths)
    assert train.root == root.resolve()
    for i in range(len(train)):
        assert train.absolute(i).exists()
    assert [c.wnid for c in read_labels(out)] == sorted(made)
    other = label(root, tmp_path / "other", val_ratio=0.25, seed=4, words=None)
    assert other.val == report.val
    assert (tmp_path / "other" / "val.txt").read_bytes() != first["val.txt"]


def test_identical_files_never_straddle_the_split(tmp_path):
    root = tmp_path / "raw"
    make_dataset(root, classes=2, per_class=20)
    for i in range(5):  # the same photo under five URLs
        write_image(root / "n00000001" / f"copy_{i}.jpg", 4242)
    report = label(root, tmp_path / "m", val_ratio=0.3, seed=0, words=None)
    assert report.duplicate_groups == 1 and report.duplicate_files == 5
    sides = [set(read_manifest(tmp_path / "m" / f"{s}.txt").paths) for s in ("train", "val")]
    copies = {f"n00000001/copy_{i}.jpg" for i in range(5)}
    assert copies <= sides[0] or copies <= sides[1]


def test_label_names_come_from_words(tmp_path):
    root = tmp_path / "raw"
    make_dataset(root, classes=2, per_class=3)
    label(root, tmp_path / "m", words={"n00000001": "tabby, tabby cat"})
    assert (tmp_path / "m" / "labels.txt").read_text() == (
        "0 n00000001 tabby, tabby cat\n1 n00000002 n00000002\n")


@pytest.mark.parametrize("setup,message", [
    (lambda root: None, "does not exist"),
    (lambda root: root.mkdir(), "0 class folder"),
    (lambda root: write_image(root / "n1" / "a.jpg", 1), "1 class folder"),
    (lambda root: [(root / d).mkdir(parents=True) for d in ("a", "b")], "no images"),
])
def test_label_bad_input_is_a_clear_error(tmp_path, setup, message):
    root = tmp_path / "raw"
    setup(root)
    with pytest.raises(InputError, match=message):
        label(root, tmp_path / "m")


def test_manifest_reader_round_trips_spaces_and_unicode_and_reports_bad_lines(tmp_path):
    pairs = [("a/with space.jpg", 0), ("b/ünïcode 名前.png", 12), ("c/tab\tinside.jpg", 3)]
    write_manifest(tmp_path / "m.txt", pairs)
    manifest = read_manifest(tmp_path / "m.txt")
    assert list(zip(manifest.paths.tolist(), manifest.labels.tolist(), strict=True)) == pairs
    (tmp_path / "bad.txt").write_text("ok.jpg 1\nno_label_here\n")
    with pytest.raises(InputError, match=r"bad.txt:2"):
        read_manifest(tmp_path / "bad.txt")
    with pytest.raises(InputError, match="does not exist"):
        read_manifest(tmp_path / "missing.txt")


@pytest.fixture
def labelled(tmp_path):
    root = tmp_path / "raw"
    make_dataset(root, classes=3, per_class=12)
    label(root, tmp_path / "manifests", val_ratio=0.25)
    return tmp_path / "manifests" / "train.txt"


@pytest.mark.parametrize("workers", [1, 2])
def test_mean_matches_a_numpy_reference(tmp_path, labelled, workers):
    result = compute_mean(labelled, tmp_path / "out" / "mean.npy", size=48, workers=workers)
    manifest = read_manifest(labelled)
    # The reference: the plain numpy mean over the same preprocessed pixels, all in memory.
    stack = np.stack([load_square(manifest.absolute(i), 48).astype(np.float64)
                      for i in range(len(manifest))])
    assert result.count == len(manifest) == 27
    saved = np.load(tmp_path / "out" / "mean.npy")
    assert saved.dtype == np.float32 and saved.shape == (48, 48, 3)
    np.testing.assert_allclose(saved, stack.mean(axis=0), atol=1e-3)
    meta = json.loads((tmp_path / "out" / "mean.json").read_text())
    np.testing.assert_allclose(meta["mean"], stack.mean(axis=(0, 1, 2)), atol=1e-3)
    np.testing.assert_allclose(meta["std"], stack.std(axis=(0, 1, 2)), atol=1e-3)
    assert meta["count"] == 27 and meta["size"] == [48, 48]
    png = np.asarray(Image.open(tmp_path / "out" / "mean.png"))
    assert png.shape == (48, 48, 3) and np.abs(png - saved).max() <= 0.5 + 1e-6
    used = (tmp_path / "out" / "mean.images.txt").read_text().splitlines()
    assert used == manifest.paths.tolist()


def test_mean_reports_unreadable_files_instead_of_skipping_silently(tmp_path, labelled):
    manifest = read_manifest(labelled)
    manifest.absolute(0).write_bytes(b"broken")
    result = compute_mean(labelled, tmp_path / "mean.npy", size=32, workers=2)
    assert result.count == len(manifest) - 1
    assert [path for path, _ in result.failed] == [manifest.paths[0]]
    meta = json.loads((tmp_path / "mean.json").read_text())
    assert meta["failed"][0]["path"] == manifest.paths[0]


@pytest.mark.parametrize("workers", [1, 2])
def test_pack_round_trips_pixels_labels_and_paths(tmp_path, labelled, workers):
    out = tmp_path / "train.h5"
    result = pack(labelled, out, size=40, workers=workers)
    manifest = read_manifest(labelled)
    assert result.count == len(manifest) and not result.failed
    with h5py.File(out, "r") as h5:
        assert h5["images"].shape == (len(manifest), 40, 40, 3)
        assert h5["images"].chunks == (1, 40, 40, 3)
        assert h5["labels"][:].tolist() == manifest.labels.tolist()
        assert [p.decode() for p in h5["paths"][:]] == manifest.paths.tolist()
        assert list(h5.attrs["label_wnids"]) == ["n00000001", "n00000002", "n00000003"]
        assert h5.attrs["size"] == 40
        for i in (0, len(manifest) - 1):
            np.testing.assert_array_equal(h5["images"][i], load_square(manifest.absolute(i), 40))
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".part")]


def test_pack_leaves_out_broken_images_and_keeps_every_row_aligned(tmp_path):
    """Enough images that the workers' shared buffers are reused many times over, with broken
    files spread through them: every row must still hold its own path's pixels and label."""
    make_dataset(tmp_path / "raw", classes=3, per_class=70)
    label(tmp_path / "raw", tmp_path / "manifests", val_ratio=0)
    manifest_path = tmp_path / "manifests" / "train.txt"
    manifest = read_manifest(manifest_path)
    broken = {3, 16, 17, 100, len(manifest) - 1}
    for index in broken:
        manifest.absolute(index).write_bytes(b"junk")
    result = pack(manifest_path, tmp_path / "t.h5", size=24, workers=2)
    assert result.count == len(manifest) - len(broken)
    assert sorted(path for path, _ in result.failed) == sorted(manifest.paths[i] for i in broken)
    kept = [i for i in range(len(manifest)) if i not in broken]
    with h5py.File(tmp_path / "t.h5", "r") as h5:
        assert [p.decode() for p in h5["paths"][:]] == manifest.paths[kept].tolist()
        assert h5["labels"][:].tolist() == manifest.labels[kept].tolist()
        images = h5["images"][:]
    for row, index in enumerate(kept):
        np.testing.assert_array_equal(images[row], load_square(manifest.absolute(index), 24))


def test_outputs_get_ordinary_file_permissions(tmp_path, labelled):
    compute_mean(labelled, tmp_path / "mean.npy", size=32)
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "mean.npy").stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_linked_file_keeps_its_bytes_when_the_original_is_replaced(tmp_path):
    """best.pt is linked to the checkpoint of its epoch; later checkpoints must not change it."""
    atomic_write_bytes(tmp_path / "checkpoint.pt", b"epoch 1")
    atomic_link(tmp_path / "checkpoint.pt", tmp_path / "best.pt")
    atomic_write_bytes(tmp_path / "checkpoint.pt", b"epoch 2")
    assert (tmp_path / "best.pt").read_bytes() == b"epoch 1"
    atomic_link(tmp_path / "checkpoint.pt", tmp_path / "best.pt")
    assert (tmp_path / "best.pt").read_bytes() == b"epoch 2"
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "checkpoint.pt"]

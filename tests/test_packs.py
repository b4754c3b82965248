"""JPEG packs and shard sets: what they store, how the loader reads them, and resuming a
pack that was killed midway. Real files throughout (the session's synthetic sample)."""

import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline.core.errors import InputError
from pipeline.formats.manifest import read_manifest
from pipeline.formats.packfile import read_pack, shard_path
from pipeline.ml.data import (
    DecodedBatches,
    EpochSampler,
    _ImageSource,
    collate,
    decode_batch,
    make_loader,
    open_images,
    sample_rng,
)
from pipeline.ml.preprocess import InputSpec, load_square
from pipeline.stages.evaluate import evaluate_checkpoint
from pipeline.stages.finetune import FinetuneConfig, finetune
from pipeline.stages.finetune.cache import _data_identity
from pipeline.stages.label import label
from pipeline.stages.pack import pack

SIZE = 72
SPEC = InputSpec(crop=64, resize=SIZE)


@pytest.fixture(scope="module")
def manifests(sample, tmp_path_factory) -> Path:
    """Labelled from a copy: label writes its hash cache into the folder it reads, and the
    session's sample is shared with tests that expect only class folders there."""
    base = tmp_path_factory.mktemp("labelled")
    shutil.copytree(sample / "files", base / "files")
    label(base / "files", base / "manifests", val_ratio=0.25)
    return base / "manifests"


@pytest.fixture(scope="module")
def packs(manifests, tmp_path_factory) -> dict[str, Path]:
    """The training split as a raw pack, a JPEG pack, and both as shard sets of 25 rows."""
    folder = tmp_path_factory.mktemp("packs")
    made = {}
    for encoding in ("raw", "jpeg"):
        made[encoding] = folder / f"{encoding}.h5"
        pack(manifests / "train.txt", made[encoding], size=SIZE, encoding=encoding, workers=2)
        made[f"{encoding}-shards"] = folder / f"{encoding}-shards.h5"
        pack(manifests / "train.txt", made[f"{encoding}-shards"], size=SIZE, encoding=encoding,
             shard_size=25, workers=2)
    return made


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-12))


def test_a_jpeg_pack_round_trips_within_jpeg_tolerance_and_is_plain_hdf5(manifests, packs):
    manifest = read_manifest(manifests / "train.txt")
    with h5py.File(packs["jpeg"], "r") as h5:
        assert h5.attrs["encoding"] == "jpeg" and h5.attrs["quality"] == 90
        assert h5["labels"][:].tolist() == manifest.labels.tolist()
        assert [p.decode() for p in h5["paths"][:]] == manifest.paths.tolist()
        offsets = h5["offsets"][:]
        assert len(offsets) == len(manifest) + 1 and offsets[-1] == len(h5["images"])
        for index in range(len(manifest)):
            data = h5["images"][offsets[index]:offsets[index + 1]]  # any h5py user: the bytes
            assert data.dtype == np.uint8 and data[:3].tobytes() == b"\xff\xd8\xff"
            pixels = np.asarray(Image.open(io.BytesIO(data.tobytes())).convert("RGB"))
            assert psnr(pixels, load_square(manifest.absolute(index), SIZE)) > 27  # q90, 4:2:0
    with h5py.File(packs["raw"], "r") as h5:
        assert h5.attrs["encoding"] == "raw" and "quality" not in h5.attrs
    assert os.path.getsize(packs["jpeg"]) * 4 < os.path.getsize(packs["raw"])


@pytest.mark.parametrize("encoding", ["raw", "jpeg"])
@pytest.mark.parametrize("train", [True, False])
def test_a_shard_set_loads_as_one_dataset_identical_to_one_pack(packs, encoding, train):
    one = open_images(packs[encoding], SPEC, train=train, seed=3)
    sharded = open_images(packs[f"{encoding}-shards"], SPEC, train=train, seed=3)
    assert len(read_pack(packs[f"{encoding}-shards"]).shards) == 6  # 135 rows / 25
    assert len(sharded) == len(one) == 135
    assert sharded.labels.tolist() == one.labels.tolist()
    assert [c.wnid for c in sharded.classes] == [c.wnid for c in one.classes]
    for index in range(len(one)):
        image, lbl = sharded[(index, 2)]
        expected, expected_label = one[(index, 2)]
        assert lbl == expected_label and torch.equal(image, expected)


def test_a_shard_set_resumes_exactly_in_a_loader_with_workers(packs):
    """Epoch 3 read from the shard set by a fresh loader (a resumed run) equals epoch 3 of an
    uninterrupted run over the single pack."""
    def epoch_batches(path: Path, epochs: list[int]) -> list:
        images = open_images(path, SPEC, train=True, seed=1)
        sampler = EpochSampler(len(images), shuffle=True, seed=1)
        loader = make_loader(images, sampler, batch_size=16, workers=2)
        seen = []
        for epoch in epochs:
            sampler.set_epoch(epoch)
            seen = [(b.images.clone(), b.labels.clone()) for b in loader]
        return seen

    uninterrupted = epoch_batches(packs["jpeg"], [1, 2, 3])
    resumed = epoch_batches(packs["jpeg-shards"], [3])
    assert len(resumed) == len(uninterrupted) == 9
    for (images, labels), (expected, expected_labels) in zip(resumed, uninterrupted,
                                                            strict=True):
        assert torch.equal(labels, expected_labels) and torch.equal(images, expected)


def test_batched_decoding_makes_the_cpu_paths_crops(packs):
    """The GPU path's code on CPU tensors: same windows, same decoder and same scaling as the
    loader's CPU path, so the very same pixels, with and without a resize."""
    for spec in (SPEC, InputSpec(crop=48, resize=60)):
        cpu = open_images(packs["jpeg-shards"], spec, train=True, seed=5)
        deferred = open_images(packs["jpeg-shards"], spec, train=True, seed=5)
        deferred.defer_decoding()
        keys = [(index, 4) for index in (0, 24, 25, 80, 134)]
        batch = collate([deferred[key] for key in keys])
        pixels, bad = decode_batch(batch.jpegs(), batch.windows, spec.crop, torch.device("cpu"))
        expected = torch.stack([cpu[key][0] for key in keys])
        assert bad == [] and pixels.shape == expected.shape and pixels.dtype == torch.uint8
        assert torch.equal(pixels, expected)
        assert batch.labels.tolist() == [cpu[key][1] for key in keys]


@pytest.mark.parametrize("train", [True, False])
def test_a_raw_pack_is_cut_without_pil_into_the_pil_paths_very_pixels(packs, train):
    """The fast path (the crop read alone, flipped and transposed in numpy) against the
    generic one (the whole image through PIL and InputSpec.apply)."""
    images = open_images(packs["raw-shards"], SPEC, train=train, seed=7)
    flips = 0
    for index in (0, 24, 25, 80, 134):
        fast, label_ = images[(index, 3)]
        slow, expected_label = _ImageSource.__getitem__(images, (index, 3))
        assert fast.is_contiguous() and fast.shape == (3, SPEC.crop, SPEC.crop)
        assert torch.equal(fast, slow) and label_ == expected_label
        flips += SPEC.window_of(SIZE, SIZE, train, sample_rng(7, 3, index)).flip
    assert flips > 0 or not train  # the flip was exercised


@pytest.mark.parametrize("pack", ["jpeg", "jpeg-shards"])
def test_a_jpeg_packs_thumbnails_are_the_pixels_training_decodes(packs, pack):
    """One JPEG decoder for a pack: what evaluate and report show is what the model saw (a
    small input size would have let PIL decode at a reduced DCT scale)."""
    images = open_images(packs[pack], InputSpec(crop=16, resize=16), train=False)
    for index in (0, len(images) - 1):
        stored = torch.from_numpy(images.rows.row(index))
        decoded = decode_jpeg(stored, mode=ImageReadMode.RGB).permute(1, 2, 0).numpy()
        assert np.array_equal(np.asarray(images.image(index)), decoded)


def test_batched_decoding_skips_only_a_corrupt_jpeg(packs):
    images = open_images(packs["jpeg"], SPEC, train=False)
    images.defer_decoding()
    samples = [images[(index, 0)] for index in range(4)]
    broken = samples[2]._replace(data=samples[2].data[:20].clone())
    batch = collate([*samples[:2], broken, samples[3]])
    pixels, bad = decode_batch(batch.jpegs(), batch.windows, SPEC.crop, torch.device("cpu"))
    assert bad == [2] and len(pixels) == 3


def test_decoded_batches_wrap_a_loader_with_workers(packs):
    images = open_images(packs["jpeg-shards"], SPEC, train=False)
    images.defer_decoding()
    loader = make_loader(images, EpochSampler(len(images), shuffle=False), batch_size=32,
                         workers=2)
    decoded = list(DecodedBatches(loader, SPEC.crop, torch.device("cpu")))
    plain = open_images(packs["jpeg"], SPEC, train=False)
    assert len(decoded) == len(loader) == 5
    assert torch.equal(decoded[-1].images[-1], plain[(134, 0)][0])
    assert sum(len(b.labels) for b in decoded) == 135


def test_a_raw_pack_cannot_defer_decoding(packs):
    with pytest.raises(InputError, match="only a pack made with --encoding jpeg"):
        open_images(packs["raw"], SPEC, train=True).defer_decoding()


@pytest.mark.slow
def test_training_and_evaluate_read_jpeg_packs_and_shard_sets(manifests, packs, tmp_path):
    pack(manifests / "val.txt", tmp_path / "val.h5", size=SIZE, encoding="jpeg",
         shard_size=20)
    run = tmp_path / "run"
    metrics = finetune(FinetuneConfig(
        train=packs["jpeg-shards"], val=tmp_path / "val.h5", weights="none", epochs=1, out=run,
        crop=64, resize=SIZE, batch_size=8, workers=0, max_steps=2, decode_device="auto"))
    assert metrics["train_images"] == 16 and 0 <= metrics["val_top1"] <= 1
    result = evaluate_checkpoint(run / "best.pt", packs["jpeg-shards"], tmp_path / "eval",
                                 workers=0).metrics
    assert result.count == 135 and not result.skipped
    cached = finetune(FinetuneConfig(
        train=packs["jpeg-shards"], val=tmp_path / "val.h5", weights="none", epochs=1,
        out=tmp_path / "cached", crop=64, resize=SIZE, batch_size=8, workers=0,
        freeze_until="conv5", cache_features="on", cache_views=2))
    assert cached["feature_cache"]["views"] == 2 and cached["train_images"] == 135


@pytest.mark.slow
def test_ddp_ranks_train_from_a_shard_set(packs, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "pipeline", "-q", "finetune",
               "--train", str(packs["jpeg-shards"]), "--weights", "none", "--epochs", "1",
               "--crop", "64", "--resize", str(SIZE), "--batch-size", "8", "--workers", "1",
               "--max-steps", "2", "--out", str(tmp_path / "ddp")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    # Summed over the ranks: 2 ranks x 2 steps x 8 images (one rank alone would say 16).
    assert metrics["train_images"] == 2 * 2 * 8
    assert metrics["epochs"] == 1 and math.isfinite(metrics["train_loss"])


@pytest.mark.slow
def test_decode_device_cuda_without_a_gpu_is_one_line(packs, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "finetune", "--train", str(packs["jpeg"]),
         "--weights", "none", "--decode-device", "cuda", "--out", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == ("error: --decode-device cuda needs a CUDA GPU; use cpu "
                                   "(or auto)")


def test_a_missing_shard_is_one_clear_error(packs, tmp_path):
    index = tmp_path / "set.h5"
    with h5py.File(packs["raw-shards"], "r") as source, h5py.File(index, "w") as copy:
        for name, value in source.attrs.items():
            copy.attrs[name] = value
        copy["labels"] = source["labels"][:]
    with pytest.raises(InputError, match=r"raw-shards-00000\.h5 is missing \(6 shard"):
        read_pack(index)


def test_the_feature_cache_key_changes_when_a_shard_changes(manifests, tmp_path):
    index = tmp_path / "train.h5"
    pack(manifests / "train.txt", index, size=SIZE, shard_size=50)
    before = _data_identity(index)
    time.sleep(0.01)
    os.utime(shard_path(index, 1))  # as if shard 1 alone were written again
    assert _data_identity(index) != before
    assert _data_identity(index)["path"] == before["path"]


def kill_midway(command: list[str], first_shard: Path, index: Path) -> None:
    """Start the pack and SIGKILL its whole process group once a shard is finished."""
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not first_shard.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    if index.exists():
        pytest.skip("the pack finished before it could be killed")


@pytest.mark.slow
def test_a_pack_killed_midway_resumes_and_equals_an_uninterrupted_one(manifests, tmp_path):
    command = [sys.executable, "-m", "pipeline", "pack", str(manifests / "train.txt"),
               "--size", str(SIZE), "--encoding", "jpeg", "--shard-size", "15", "--workers",
               "1", "--out"]
    killed = tmp_path / "killed" / "train.h5"
    killed.parent.mkdir()
    kill_midway([*command, str(killed)], shard_path(killed, 1), killed)
    finished = {path: path.stat().st_ino for path in killed.parent.glob("train-*.h5")}
    assert finished and len(finished) < 9
    done = subprocess.run([*command, str(killed)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"9 shard(s), {len(finished)} kept from an earlier run" in done.stdout
    for path, inode in finished.items():
        assert path.stat().st_ino == inode  # finished shards were kept, not written again
    assert not list(killed.parent.glob(".*.part"))
    reference = tmp_path / "reference" / "train.h5"
    pack(manifests / "train.txt", reference, size=SIZE, encoding="jpeg", shard_size=15)
    for number in range(9):
        with h5py.File(shard_path(killed, number)) as a, \
                h5py.File(shard_path(reference, number)) as b:
            assert a["labels"][:].tolist() == b["labels"][:].tolist()
            assert np.array_equal(a["images"][:], b["images"][:])
            assert np.array_equal(a["offsets"][:], b["offsets"][:])
    assert read_pack(killed).labels.tolist() == read_pack(reference).labels.tolist()


def test_packing_again_removes_only_stale_shards_of_ours(manifests, tmp_path):
    index = tmp_path / "train.h5"
    pack(manifests / "train.txt", index, size=SIZE, shard_size=40)  # 4 shards
    unrelated = tmp_path / "train-20240.h5"  # a user's file that merely looks like a shard
    unrelated.write_bytes(b"not ours")
    pack(manifests / "train.txt", index, size=SIZE, shard_size=70)  # 2 shards
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "train-00000.h5", "train-00001.h5", "train-20240.h5", "train.h5"]
    pack(manifests / "train.txt", index, size=SIZE)  # one file: the shard set is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-20240.h5", "train.h5"]
    assert len(read_pack(index).labels) == 135


def camera_exif() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 1  # upright
    exif[0x927C] = b"maker notes " * 700  # what cameras and editors carry along
    return exif.tobytes()


CAMERA_EXIF = camera_exif()


def test_a_jpeg_that_already_fits_is_stored_as_it_is_and_others_are_re_encoded(tmp_path):
    """A size x size baseline JPEG no finer than --quality keeps its bytes (no generation
    loss, as LitData and WebDataset keep files); anything else is squared and encoded."""
    files = tmp_path / "files"
    sources = {}
    for c, wnid in enumerate(("n00000001", "n00000002")):
        for i, (size, fmt, options) in enumerate((
                ((SIZE, SIZE), "JPEG", {"quality": 90}),  # fits: kept
                ((SIZE, SIZE), "JPEG", {"quality": 75}),  # coarser: kept
                ((SIZE, SIZE), "JPEG", {"quality": 98}),  # finer than asked: re-encoded
                ((SIZE, SIZE), "JPEG", {"quality": 90, "progressive": True}),  # re-encoded
                ((SIZE + 20, SIZE), "JPEG", {"quality": 90}),  # not square: re-encoded
                ((SIZE, SIZE), "PNG", {}),  # re-encoded
                ((SIZE, SIZE), "JPEG", {"quality": 90, "exif": CAMERA_EXIF,
                                        "comment": b"edited"}))):  # kept, metadata left out
            path = files / wnid / f"{wnid}_{i}.{fmt.lower().replace('jpeg', 'jpg')}"
            path.parent.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng(c * 10 + i)
            pixels = np.kron(rng.integers(0, 256, (size[1] // 8 + 1, size[0] // 8 + 1, 3)),
                             np.ones((8, 8, 1)))[:size[1], :size[0]].astype(np.uint8)
            Image.fromarray(pixels).save(path, fmt, **options)
            sources[path.relative_to(files).as_posix()] = (i, path.read_bytes())
    label(files, tmp_path / "manifests", val_ratio=0.0)
    result = pack(tmp_path / "manifests" / "train.txt", tmp_path / "pack.h5", size=SIZE,
                  encoding="jpeg", quality=90)
    assert result.count == 14 and not result.failed
    with h5py.File(tmp_path / "pack.h5", "r") as h5:
        data, offsets = h5["images"][:].tobytes(), h5["offsets"][:].tolist()
        stored = {path.decode(): data[start:end] for path, start, end
                  in zip(h5["paths"][:], offsets[:-1], offsets[1:], strict=True)}
    for path, (kind, original) in sources.items():
        assert (stored[path] == original) == (kind in (0, 1)), path
        decoded = Image.open(io.BytesIO(stored[path]))
        assert decoded.size == (SIZE, SIZE) and decoded.mode == "RGB"
        if kind == 6:  # the same pixels, without its 8 KB of EXIF and its comment
            assert len(stored[path]) < len(original) - 8000
            assert "exif" not in decoded.info and "comment" not in decoded.info
            assert np.array_equal(np.asarray(decoded), np.asarray(Image.open(files / path)))


def test_a_jpeg_pack_in_an_earlier_layout_is_one_clear_error(packs, tmp_path):
    old = tmp_path / "old.h5"
    shutil.copy(packs["jpeg"], old)
    with h5py.File(old, "a") as h5:
        h5.attrs["layout"] = "N JPEG (vlen uint8)"
    with pytest.raises(InputError, match="earlier layout.*pack it again"):
        open_images(old, SPEC, train=True)

#!/usr/bin/env python3
"""Benchmark our loader (raw and JPEG packs) against FFCV, LitData and WebDataset, in one run.

Same images, same transform (a random 224x224 crop and a horizontal flip, uint8 N x 3 x 224 x
224 out), same batch size, 2 loader workers each, warm page cache; per loader: the time and
size of its pack step, and images/s of every epoch, the figure being the median of epochs
2..E (epoch 1 warms caches and starts workers). The images (--source):

- `sample`: the bench's own 256x256 JPEGs at quality 90, made from the offline sample: our
  JPEG pack stores them as they are (they already are what it would write), as LitData and
  WebDataset do, while FFCV re-encodes them.
- `photos`: real photographs of mixed sizes and qualities, as a web-gathered dataset has:
  scikit-image's sample photos (pipeline.testing.pictures), each file a random crop (aspect
  0.6-1.7) resized to a shorter side of 160-1200 px (log-uniform), saved as JPEG at quality
  50-98 (a fifth with 4:4:4 chroma) or, one in twelve, PNG. Every pack re-encodes: ours to
  256x256 (shorter side 256, centre crop), FFCV to a longer side of at most 256 (its
  max_resolution), and LitData and WebDataset get each photo resized to a shorter side of 256
  and re-encoded at q90 in their pack step (stored as they are, a 1200 px photo would cost
  them 20x the decode per epoch: nobody trains on ImageNet that way).

- ours raw / ours jpeg: `pipeline pack` (--encoding raw | jpeg --quality 90), then
  `open_images` + `EpochSampler` + `make_loader` as `pipeline finetune` uses them.
- FFCV: `DatasetWriter` with `RGBImageField(write_mode="raw" | "jpg", jpeg_quality=90)`;
  `Loader` with `RandomResizedCropRGBImageDecoder` at scale (224/256)^2 and ratio 1 (a plain
  random 224 crop of a 256 image), `RandomHorizontalFlip`, `ToTensor`, `ToTorchImage`. Its
  pip install compiles a C++ extension against libturbojpeg and OpenCV found through
  pkg-config, so the machine needs g++ and (Debian) `apt-get install pkg-config
  libturbojpeg0-dev libopencv-dev`; where they are missing, the output says exactly that and
  FFCV is left out. Its first epoch is mostly numba compiling its pipeline (~15 s).
- LitData: `optimize` (the JPEG bytes as they are, 64 MB chunks) + `StreamingDataset` /
  `StreamingDataLoader`, decoding with PIL.
- WebDataset: tar shards of the JPEG bytes (`TarWriter`), `WebDataset` + shuffle + PIL decode.

Peers live in a venv of their own (--peers-venv, created on first use; it sees this venv's
torch, numpy and Pillow through a .pth line), never in the project's dependencies. They are
installed from PyPI (ffcv, litdata, webdataset and their small dependencies: numba,
opencv-python, boto3, ...) with this venv's torch, torchvision, numpy and Pillow versions as
constraints, so pip never fetches a torch build of its own; a peer that would need other
versions fails to install and is left out with pip's reason. Every pack and loader runs as a
whole command (interpreter start-up included), measured with benchlib after waiting for the
shared machine to be quiet; runs disturbed by other load say so.

    python scripts/bench/loader.py [--source sample|photos] [--images 10000] [--epochs 4]
                                   [--batch-size 64]
                                   [--workers 2] [--workdir /tmp/bench-loader]
                                   [--peers-venv /work/bench-venvs/loader-peers]
                                   [--skip-peers] [--quiet-wait 120]

Prints a table, then one summary line: ours vs the fastest peer per storage kind (images/s,
pack time, pack size). A smoke run: --images 200 --epochs 2 --quiet-wait 0 (epoch 1 alone
would give FFCV's compile time; a 200-image epoch is too short for the figures to mean much).
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

import benchlib

CROP, SIZE, QUALITY = 224, 256, 90
PEER_PACKAGES = {"litdata": "litdata", "webdataset": "webdataset", "ffcv": "ffcv"}
SHARED = ("torch", "torchvision", "numpy", "pillow")  # the peers use this venv's, pinned
FFCV_SYSTEM_LIBS = ("libturbojpeg", "opencv4")
DEFAULT_PEERS_VENV = Path("/work/bench-venvs/loader-peers")
SCRIPT = Path(__file__).resolve()


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # raw or jpeg: what is stored
    peer: str | None  # the package it needs (None: ours)


CASES = (Case("ours raw", "raw", None), Case("ours jpeg", "jpeg", None),
         Case("FFCV raw", "raw", "ffcv"), Case("FFCV jpg", "jpeg", "ffcv"),
         Case("LitData", "jpeg", "litdata"), Case("WebDataset", "jpeg", "webdataset"))


@dataclass
class Result:
    case: Case
    pack_seconds: float = 0.0
    pack_bytes: int = 0
    epochs: list[float] = field(default_factory=list)
    other_load: float = 0.0
    note: str = ""

    @property
    def rate(self) -> float:
        """The median images/s of epochs 2..E (epoch 1 alone when it is the only one)."""
        return statistics.median(self.epochs[1:] or self.epochs) if self.epochs else 0.0


# --------------------------------------------------------------------------- the images

SOURCES = ("sample", "photos")
PHOTO_CLASSES = 10


def source_images(workdir: Path, count: int, source: str) -> Path:
    """`count` files listed as `path label` lines in images-SOURCE.txt, under
    workdir/SOURCE: every loader reads exactly these files."""
    listing = workdir / f"images-{source}.txt"
    if listing.exists() and len(listing.read_text().splitlines()) == count:
        return listing
    return (_sample_files if source == "sample" else _photo_files)(workdir, count, listing)


def _photo_files(workdir: Path, count: int, listing: Path) -> Path:
    """Real photographs of mixed sizes and qualities (see the module's docstring)."""
    import random

    from pipeline.testing.pictures import photographs

    photos = list(photographs().values())
    rng = random.Random(0)
    lines = []
    for number in range(count):
        label = number % PHOTO_CLASSES
        image = _random_crop(photos[rng.randrange(len(photos))], rng)
        shorter = round(math.exp(rng.uniform(math.log(160), math.log(1200))))
        scale = shorter / min(image.size)
        image = image.resize((max(1, round(image.width * scale)),
                              max(1, round(image.height * scale))), Image.BICUBIC)
        folder = workdir / "photos" / f"c{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        if rng.random() < 1 / 12:
            out = folder / f"{number:06d}.png"
            image.save(out, "PNG")
        else:
            out = folder / f"{number:06d}.jpg"
            image.save(out, "JPEG", quality=rng.randint(50, 98),
                       subsampling=0 if rng.random() < 0.2 else 2)
        lines.append(f"{out} {label}")
    listing.write_text("".join(f"{line}\n" for line in lines))
    return listing


def _random_crop(image: Image.Image, rng) -> Image.Image:
    """A crop of a random aspect ratio (0.6-1.7) and 40-100% of the photo's shorter side."""
    aspect = math.exp(rng.uniform(math.log(0.6), math.log(1.7)))
    side = min(image.size) * rng.uniform(0.4, 1.0)
    width = min(image.width, round(side * math.sqrt(aspect)))
    height = min(image.height, round(side / math.sqrt(aspect)))
    left = rng.randint(0, image.width - width)
    top = rng.randint(0, image.height - height)
    return image.crop((left, top, left + width, top + height))


def _sample_files(workdir: Path, count: int, listing: Path) -> Path:
    """256x256 JPEGs (q90) from the offline sample."""
    from pipeline.ml.preprocess import square_image
    from pipeline.testing import make_sample

    classes = 10
    sample = workdir / "sample"
    make_sample.make_sample(sample, classes=classes, per_class=-(-count // classes))
    originals = sorted(p for p in (sample / "files").rglob("*") if p.is_file())
    wnids = sorted({p.parent.name for p in originals})
    lines = []
    for path in originals[:count]:
        out = workdir / "jpegs" / path.parent.name / f"{path.stem}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        square_image(path, SIZE).save(out, "JPEG", quality=QUALITY)
        lines.append(f"{out} {wnids.index(path.parent.name)}")
    listing.write_text("".join(f"{line}\n" for line in lines))
    return listing


def read_listing(listing: Path) -> list[tuple[str, int]]:
    return [(line.rsplit(" ", 1)[0], int(line.rsplit(" ", 1)[1]))
            for line in listing.read_text().splitlines()]


def our_manifest(workdir: Path, listing: Path, source: str) -> Path:
    """The same files as a `pipeline label`-style manifest folder (paths relative to a root)."""
    folder = workdir / f"manifests-{source}"
    folder.mkdir(exist_ok=True)
    root = workdir / ("jpegs" if source == "sample" else "photos")
    items = read_listing(listing)
    (folder / "root.txt").write_text(f"{os.path.relpath(root, folder)}\n")
    (folder / "train.txt").write_text("".join(
        f"{Path(path).relative_to(root)} {label}\n" for path, label in items))
    wnids = sorted({Path(path).parent.name for path, _ in items})
    (folder / "labels.txt").write_text("".join(f"{i} {w} {w}\n" for i, w in enumerate(wnids)))
    return folder / "train.txt"


# --------------------------------------------------------------------------- the peers' venv

def ensure_peers(venv: Path) -> dict[str, str]:
    """Install the peers (each on its own: one failing leaves the others); returns the reason
    for each peer that is not available."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating {venv} for the peers ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                               "['purelib'])"], capture_output=True, text=True,
                              check=True).stdout.strip()
        ours = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig."
                               "get_paths()['purelib'])"], capture_output=True, text=True,
                              check=True).stdout.strip()
        Path(site, "project_torch.pth").write_text(f"{ours}\n")  # torch, numpy, Pillow
    pins = venv / "project-pins.txt"  # the shared packages at this venv's versions
    pins.write_text("".join(f"{name}=={metadata.version(name)}\n" for name in SHARED))
    missing = {}
    for peer, package in PEER_PACKAGES.items():
        if _imports(python, peer):
            continue
        if peer == "ffcv" and (reason := _ffcv_blocker()):
            missing[peer] = reason
            continue
        print(f"installing {package} into {venv} ...", flush=True)
        done = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet",
                               "--disable-pip-version-check", "--constraint", str(pins),
                               package],
                              capture_output=True, text=True)
        if done.returncode != 0 or not _imports(python, peer):
            errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
            missing[peer] = f"pip install {package} failed: " + " | ".join(errors[-3:] or
                                                                          [done.stderr[-300:]])
    return missing


def _imports(python: Path, module: str) -> bool:
    return subprocess.run([str(python), "-c", f"import {module}"],
                          capture_output=True).returncode == 0


def _ffcv_blocker() -> str | None:
    """Why FFCV cannot be built here, or None: its setup.py finds libturbojpeg and OpenCV
    through pkg-config and compiles against them."""
    if shutil.which("pkg-config") is None:
        return ("not built: pkg-config is not installed, and FFCV's setup.py needs it to find "
                "libturbojpeg and OpenCV (apt-get install pkg-config libturbojpeg0-dev "
                "libopencv-dev)")
    absent = [lib for lib in FFCV_SYSTEM_LIBS
              if subprocess.run(["pkg-config", "--exists", lib]).returncode != 0]
    if absent:
        return (f"not built: pkg-config finds no {' and no '.join(absent)} on this machine; "
                "FFCV compiles against them (apt-get install libturbojpeg0-dev "
                "libopencv-dev, which this benchmark does not do for you)")
    return None


def versions(python: Path, modules: list[str]) -> str:
    code = ("import importlib.metadata as m, sys\n"
            "print(', '.join(f'{n} {m.version(n)}' for n in sys.argv[1:]))")
    return subprocess.run([str(python), "-c", code, *modules], capture_output=True,
                          text=True).stdout.strip()


# --------------------------------------------------------------------------- the cases
# Each runs in its own process (`--step pack|load --case NAME`), under the right venv.

def pack_case(case: str, listing: Path, out: Path, workers: int, source: str) -> None:
    items = read_listing(listing)
    read = _resized_jpeg if source == "photos" else (lambda path: Path(path).read_bytes())
    if case.startswith("FFCV"):
        _ffcv_pack(items, out, "raw" if case == "FFCV raw" else "jpg", workers)
    elif case == "LitData":
        import litdata

        litdata.optimize(fn=_litdata_sample, inputs=[(path, label, source) for path, label
                                                     in items],
                         output_dir=str(out), chunk_bytes="64MB", num_workers=workers,
                         mode="overwrite")
    elif case == "WebDataset":
        import webdataset

        out.mkdir(parents=True, exist_ok=True)
        shards = max(4, workers * 2)  # every worker gets shards of its own
        per_shard = -(-len(items) // shards)
        for number in range(shards):
            with webdataset.TarWriter(str(out / f"shard-{number:05d}.tar")) as writer:
                for index, (path, label) in enumerate(items[number * per_shard:
                                                            (number + 1) * per_shard]):
                    writer.write({"__key__": f"{number:05d}{index:07d}",
                                  "jpg": read(path), "cls": label})
    else:
        raise SystemExit(f"pack_case: unknown case {case!r}")


def _litdata_sample(item: tuple[str, int, str]) -> dict:
    path, label, source = item
    data = _resized_jpeg(path) if source == "photos" else Path(path).read_bytes()
    return {"image": data, "label": label}


def _resized_jpeg(path: str) -> bytes:
    """A photo at a shorter side of SIZE, re-encoded at QUALITY: what the peers that store
    bytes as given are handed for --source photos."""
    image = Image.open(path).convert("RGB")
    scale = SIZE / min(image.size)
    image = image.resize((max(SIZE, round(image.width * scale)),
                          max(SIZE, round(image.height * scale))), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=QUALITY)
    return buffer.getvalue()


def _ffcv_pack(items: list[tuple[str, int]], out: Path, mode: str, workers: int) -> None:
    import numpy as np
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    class Images:
        def __len__(self) -> int:
            return len(items)

        def __getitem__(self, index: int) -> tuple:
            path, label = items[index]
            return np.asarray(Image.open(path).convert("RGB")), label

    writer = DatasetWriter(str(out), {
        "image": RGBImageField(write_mode=mode, max_resolution=SIZE, jpeg_quality=QUALITY),
        "label": IntField()}, num_workers=workers)
    writer.from_indexed_dataset(Images())


def load_case(case: str, data: Path, epochs: int, batch_size: int, workers: int) -> list[float]:
    """Images/s of each epoch."""
    batches = {"FFCV raw": _ffcv_loader, "FFCV jpg": _ffcv_loader, "LitData": _litdata_loader,
               "WebDataset": _webdataset_loader}.get(case, _our_loader)(data, batch_size,
                                                                         workers)
    rates = []
    for epoch in range(1, epochs + 1):
        started, seen = time.perf_counter(), 0
        for images, _ in batches(epoch):
            assert str(images.dtype) == "torch.uint8" and images.shape[1:] == (3, CROP, CROP)
            seen += len(images)
        rates.append(seen / (time.perf_counter() - started))
    return rates


def _our_loader(data: Path, batch_size: int, workers: int):
    from pipeline.ml.data import EpochSampler, make_loader, open_images
    from pipeline.ml.preprocess import InputSpec

    images = open_images(data, InputSpec(CROP, SIZE), train=True)
    sampler = EpochSampler(len(images), shuffle=True)
    loader = make_loader(images, sampler, batch_size=batch_size, workers=workers)

    def epoch(number: int):
        sampler.set_epoch(number)
        return ((batch.images, batch.labels) for batch in loader)
    return epoch


def _pil_transform():
    """The peers' transform on a decoded PIL image: a random 224 crop, a flip, uint8 CHW."""
    from torchvision.transforms import v2

    return v2.Compose([v2.PILToTensor(), v2.RandomCrop(CROP), v2.RandomHorizontalFlip()])


def _litdata_loader(data: Path, batch_size: int, workers: int):
    import litdata
    from PIL import Image

    transform = _pil_transform()

    class Images(litdata.StreamingDataset):
        def __getitem__(self, index):
            sample = super().__getitem__(index)
            image = Image.open(io.BytesIO(sample["image"])).convert("RGB")
            return transform(image), sample["label"]

    loader = litdata.StreamingDataLoader(Images(str(data), shuffle=True),
                                         batch_size=batch_size, num_workers=workers)
    return lambda number: iter(loader)


def _webdataset_loader(data: Path, batch_size: int, workers: int):
    import torch
    import webdataset

    transform = _pil_transform()
    urls = sorted(str(p) for p in data.glob("shard-*.tar"))
    dataset = (webdataset.WebDataset(urls, shardshuffle=len(urls), empty_check=False)
               .shuffle(1000).decode("pil").to_tuple("jpg", "cls")
               .map_tuple(lambda image: transform(image.convert("RGB")), int)
               .batched(batch_size, partial=True))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                         persistent_workers=True)
    return lambda number: iter(loader)


def _ffcv_loader(data: Path, batch_size: int, workers: int):
    from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip, ToTensor, ToTorchImage

    scale = (CROP / SIZE) ** 2
    loader = Loader(str(data), batch_size=batch_size, num_workers=workers,
                    order=OrderOption.RANDOM, os_cache=True, pipelines={
                        "image": [RandomResizedCropRGBImageDecoder((CROP, CROP),
                                                                   scale=(scale, scale),
                                                                   ratio=(1.0, 1.0)),
                                  RandomHorizontalFlip(), ToTensor(),
                                  ToTorchImage(channels_last=False)],
                        "label": [IntDecoder(), ToTensor()]})
    return lambda number: iter(loader)


# --------------------------------------------------------------------------- the run

def pack_output(workdir: Path, case: Case) -> Path:
    slug = case.name.lower().replace(" ", "-")
    return workdir / "packs" / (f"{slug}.h5" if case.peer is None else
                                f"{slug}.beton" if case.peer == "ffcv" else slug)


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_case(case: Case, python: Path, args: argparse.Namespace, listing: Path,
             manifest: Path, quiet) -> Result:

    out = pack_output(args.workdir, case)
    if out.is_dir():
        shutil.rmtree(out)
    out.unlink(missing_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    logs = args.workdir / "logs"
    logs.mkdir(exist_ok=True)
    slug = out.stem
    if case.peer is None:
        argv = [sys.executable, "-m", "pipeline", "-q", "pack", str(manifest), "--size",
                str(SIZE), "--encoding", case.kind, "--quality", str(QUALITY), "--workers",
                str(args.workers), "--out", str(out)]
    else:
        argv = [str(python), str(SCRIPT), "--step", "pack", "--case", case.name, "--listing",
                str(listing), "--data", str(out), "--workers", str(args.workers),
                "--source", args.source]
    worst = benchlib.wait_for_quiet(quiet)
    packed = benchlib.run_measured(argv, logs / f"{slug}-pack.log", timeout=args.run_timeout)
    figures = args.workdir / "logs" / f"{slug}-epochs.json"
    argv = [str(python if case.peer else sys.executable), str(SCRIPT), "--step", "load",
            "--case", case.name, "--data", str(out), "--epochs", str(args.epochs),
            "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--figures",
            str(figures)]
    worst = max(worst, benchlib.wait_for_quiet(quiet))
    loaded = benchlib.run_measured(argv, logs / f"{slug}-load.log", timeout=args.run_timeout)
    return Result(case, packed.seconds, size_of(out), json.loads(figures.read_text()),
                  max(worst, packed.other_load, loaded.other_load))


def report(results: list[Result], skipped: dict[str, str], images: int, args) -> None:

    rows = [["loader", "stores", "pack s", "pack MB", *[f"epoch {e}" for e in
                                                         range(1, args.epochs + 1)],
             "median 2..E img/s", "other load"]]
    for r in results:
        rows.append([r.case.name, r.case.kind, f"{r.pack_seconds:.1f}",
                     f"{r.pack_bytes / 2**20:.1f}", *[f"{e:.0f}" for e in r.epochs],
                     f"{r.rate:.0f}", f"{r.other_load:.0%}"])
    what = (f"{SIZE}x{SIZE} JPEGs (q{QUALITY})" if args.source == "sample" else
            "photographs of mixed sizes and qualities")
    print(f"\n{images} {what}, packs at {SIZE} (JPEG q{QUALITY}), random {CROP} crop + flip, "
          f"uint8 NCHW, batch {args.batch_size}, {args.workers} workers, {args.epochs} "
          "epoch(s)")
    print(benchlib.format_table(rows))
    for peer, reason in skipped.items():
        print(f"left out: {peer}: {reason}")
    warning = benchlib.disturbed_warning(max((r.other_load for r in results), default=0),
                                         args.max_other_load)
    if warning:
        print(warning)
    print(summary(results))


def summary(results: list[Result]) -> str:
    parts = []
    for kind in ("raw", "jpeg"):
        ours = next(r for r in results if r.case.peer is None and r.case.kind == kind)
        peers = [r for r in results if r.case.peer and r.case.kind == kind]
        if not peers:
            parts.append(f"{kind}: ours {ours.rate:.0f} img/s, no peer ran")
            continue
        best = max(peers, key=lambda r: r.rate)
        verdict = "met" if ours.rate >= best.rate else "MISSED"
        smallest = min(peers, key=lambda r: r.pack_bytes)
        fastest_pack = min(peers, key=lambda r: r.pack_seconds)
        parts.append(
            f"{kind}: ours {ours.rate:.0f} vs {best.case.name} {best.rate:.0f} img/s "
            f"({ours.rate / best.rate:.2f}x, {verdict}); pack {ours.pack_seconds:.1f} s vs "
            f"{fastest_pack.pack_seconds:.1f} s ({fastest_pack.case.name}), "
            f"{ours.pack_bytes / 2**20:.0f} MB vs {smallest.pack_bytes / 2**20:.0f} MB "
            f"({smallest.case.name})")
    return "SUMMARY loader: " + " | ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", choices=SOURCES, default="sample",
                        help="the bench's 256x256 JPEGs, or real photos of mixed sizes")
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-loader"))
    parser.add_argument("--peers-venv", type=Path, default=DEFAULT_PEERS_VENV)
    parser.add_argument("--skip-peers", action="store_true")
    benchlib.add_quiet_arguments(parser)
    parser.add_argument("--run-timeout", type=float, default=1800.0)
    # one step of one case, in a process of its own (the benchmark runs these)
    parser.add_argument("--step", choices=("pack", "load"), help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--listing", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--figures", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step == "pack":
        pack_case(args.case, args.listing, args.data, args.workers, args.source)
        return
    if args.step == "load":
        rates = load_case(args.case, args.data, args.epochs, args.batch_size, args.workers)
        args.figures.write_text(json.dumps(rates))
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    listing = source_images(args.workdir, args.images, args.source)
    manifest = our_manifest(args.workdir, listing, args.source)
    skipped = ({peer: "--skip-peers" for peer in PEER_PACKAGES} if args.skip_peers
               else ensure_peers(args.peers_venv))
    python = args.peers_venv / "bin" / "python"
    present = [p for p in PEER_PACKAGES if p not in skipped]
    if present:
        print(f"peers: {versions(python, present)}", flush=True)
    quiet = benchlib.quiet_from(args)
    results = []
    for case in CASES:
        if case.peer in skipped:
            continue
        print(f"{case.name}: pack, then {args.epochs} epoch(s) ...", flush=True)
        results.append(run_case(case, python, args, listing, manifest, quiet))
    report(results, skipped, len(read_listing(listing)), args)


if __name__ == "__main__":
    main()

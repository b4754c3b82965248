"""The options of the stages that are one module each, written once (see core/options.py).

Here rather than in the stage modules so `cli.py` can build the commands without importing
numpy, PIL or h5py (every `--help` stays fast); the stage functions take their defaults from
here too. gather and finetune keep theirs in `stages/gather/options.py` and
`stages/finetune/options.py`. tests/test_options.py checks the Makefile's `?=` values against
them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import InputError
from pipeline.core.options import option

SIZE = 256  # images are packed and averaged at SIZE x SIZE; finetune resizes to it
EXPORT_FORMATS = ("pt2", "torchscript", "onnx")  # `pipeline export --format`, default first
CROSS_CLASS = ("drop", "first", "keep")  # `pipeline label --cross-class`
ENCODINGS = ("raw", "jpeg")  # `pipeline pack --encoding`: pixels, or JPEG bytes
JPEG_QUALITY = 90  # `pipeline pack --quality`
PRECISIONS = ("fp32", "bf16", "fp16")  # `--precision` of finetune and predict


@dataclass(frozen=True)
class ValidateOptions:
    quarantine: Path | None = option(None, type=Path, path="dir", help=(
        "Where unreadable files are moved.  [default: ROOT/../rejected]"))
    report: Path | None = option(None, type=Path, path="file", help=(
        "JSON Lines log of every quarantined file.  [default: ROOT/../validate.jsonl]"))
    min_size: int = option(32, min=0, help=(  # shorter side in pixels, as gather's --min-size
        "Images whose shorter side is smaller are quarantined as too_small."))
    seconds_per_file: float = option(30.0, min=0.1, help=(
        "A file that takes longer to decode is quarantined."))
    workers: int = 1  # the command line's --workers: all cores

    def quarantine_of(self, root: Path) -> Path:
        return self.quarantine or root.parent / "rejected"

    def report_of(self, root: Path) -> Path:
        return self.report or root.parent / "validate.jsonl"


def _quality_flags(text: str) -> tuple[str, ...]:
    from pipeline.core.quality import parse_flags  # numpy: imported when used

    try:
        return parse_flags(text)
    except ValueError as error:
        raise InputError(f"--drop-quality: {error}") from None


@dataclass(frozen=True)
class LabelOptions:
    val_ratio: float = option(0.1, min=0.0, max=1.0, max_open=True, help=(
        "Share of each class held out for validation."))
    seed: int = option(0, help="Seed of the split.")
    # Bits of the 64-bit perceptual hash two copies may differ by (0: byte-identical only);
    # pipeline/core/perceptual.py says what 10 matches and what it does not.
    near_distance: int = option(10, min=0, max=15, help=(
        "Images whose 64-bit perceptual hashes differ in at most this many bits (and agree on "
        "a finer hash) are copies: re-encoded, rescaled, slightly cropped or bordered (0: "
        "byte-identical files only)."))
    cross_class: str = option("drop", choices=CROSS_CLASS, help=(
        "Copies found in several classes: drop them all, keep those of the first class (in "
        "label order), or keep every copy (on one side of the split). Listed in "
        "OUT/conflicts.txt either way; nothing is deleted."))
    drop_quality: tuple[str, ...] = option(
        (), type=str, metavar="FLAG[,FLAG...]", parse=_quality_flags, help=(
            "Leave images with these quality flags out of the manifests (listed in "
            "OUT/quality.csv, never deleted): dark, bright, blurry, low_information, "
            "odd_aspect, grayscale."))
    cache_dir: Path | None = option(None, type=Path, path="dir", help=(
        "Where the hashes of the images are cached (by absolute path, size and mtime), so a "
        "rerun hashes only new or changed files; never the input folder.  [default: OUT]"))


@dataclass(frozen=True)
class EvaluateOptions:
    batch_size: int = option(64, min=1, help="Images per batch.")
    workers: int = option(2, min=0, help="Loader processes.")


@dataclass(frozen=True)
class PredictOptions:
    top_k: int = option(5, min=1, help="Classes listed per image.")
    batch_size: int = option(64, min=1, help="Images per forward pass.")
    workers: int = option(2, min=0, help="Loader processes decoding the images (0: in this "
                                         "process).")
    precision: str = option("fp32", choices=PRECISIONS, help=(
        "bf16: autocast, ~3x faster on CPUs with AVX512-BF16 or AMX and on recent GPUs (the "
        "probabilities move by about 1e-2); fp16 needs CUDA."))


def _size() -> Any:
    """--size of mean and pack: one option, so the two agree."""
    return option(SIZE, min=8, help=(
        "Images are resized (shorter side) and center-cropped to SIZE x SIZE."))


@dataclass(frozen=True)
class MeanOptions:
    size: int = _size()


@dataclass(frozen=True)
class PackOptions:
    """How `pipeline pack` stores images: their size, and raw pixels or JPEG at a quality."""

    size: int = _size()
    encoding: str = option(ENCODINGS[0], choices=ENCODINGS, help=(
        "raw: uint8 pixels (fastest to read); jpeg: JPEG bytes at --quality (5-10x smaller, "
        "decoded by the loader)."))
    quality: int = option(JPEG_QUALITY, min=1, max=100, help="JPEG quality of --encoding jpeg.")

    def check(self) -> None:
        if self.encoding not in ENCODINGS:
            raise InputError(f"unknown --encoding {self.encoding!r}; one of "
                             f"{', '.join(ENCODINGS)}")
        if not 1 <= self.quality <= 100:
            raise InputError(f"--quality {self.quality} is outside 1..100")

    @property
    def stored_quality(self) -> int | None:
        return self.quality if self.encoding == "jpeg" else None


@dataclass(frozen=True)
class ExportOptions:
    fmt: str = option(EXPORT_FORMATS[0], flag="--format", choices=EXPORT_FORMATS, help=(
        "pt2: a torch.export program (torch.export.load(path).module()), any batch at a fixed "
        "size; torchscript: torch.jit.load, any size (deprecated by PyTorch, still loaded by "
        "LibTorch); onnx: onnxruntime, any batch at a fixed size (needs the onnx extra)."))
    size: int | None = option(None, type=int, min=8, help=(
        "pt2 and ONNX: the input height and width.  [default: the checkpoint's resize, the "
        "size `pipeline pack` wrote]"))


VALIDATE = ValidateOptions()
LABEL = LabelOptions()
EVALUATE = EvaluateOptions()
PREDICT = PredictOptions()
MEAN = MeanOptions()
PACK = PackOptions()
EXPORT = ExportOptions()

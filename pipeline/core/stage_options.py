"""The defaults of the stages that have no options module of their own, written once.

Standard library only, so `cli.py` can hand them to click without importing numpy, PIL or
h5py (every `--help` stays fast); the stage functions take their defaults from here too.
gather and finetune keep theirs in `pipeline/stages/gather/options.py` and
`pipeline/stages/finetune/options.py`. tests/test_options.py checks the Makefile's `?=` values
against them.
"""

from __future__ import annotations

from dataclasses import dataclass

SIZE = 256  # images are packed and averaged at SIZE x SIZE; finetune resizes to it
EXPORT_FORMATS = ("torchscript", "onnx")  # `pipeline export --format`
CROSS_CLASS = ("drop", "first", "keep")  # `pipeline label --cross-class`
ENCODINGS = ("raw", "jpeg")  # `pipeline pack --encoding`: pixels, or JPEG bytes
JPEG_QUALITY = 90  # `pipeline pack --quality`


@dataclass(frozen=True)
class ValidateDefaults:
    min_size: int = 32  # shorter side in pixels, as gather's --min-size
    seconds_per_file: float = 30.0


@dataclass(frozen=True)
class LabelDefaults:
    val_ratio: float = 0.1
    seed: int = 0
    # Bits of the 64-bit perceptual hash two copies may differ by (0: byte-identical only);
    # pipeline/core/perceptual.py says what 10 matches and what it does not.
    near_distance: int = 10
    cross_class: str = "drop"  # an image in two classes carries two labels: drop by default


@dataclass(frozen=True)
class EvaluateDefaults:
    batch_size: int = 64
    workers: int = 2
    top_k: int = 5


VALIDATE = ValidateDefaults()
LABEL = LabelDefaults()
EVALUATE = EvaluateDefaults()

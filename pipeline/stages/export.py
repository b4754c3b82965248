"""`pipeline export`: a checkpoint as one self-contained file for serving without `pipeline`.

The exported model takes what a server has at hand, decoded uint8 RGB images (N x H x W x 3),
and does the checkpoint's evaluation preprocessing inside: shorter side to the checkpoint's
resize (bilinear, antialiased like Pillow's), centre crop, normalization with the checkpoint's
own mean and std tensors. It returns class probabilities. The label map and the
preprocessing description travel inside the same file (key `pipeline.json`: a torch.export
or TorchScript extra file, ONNX metadata), so nothing has to be re-implemented, or kept
beside it, by whoever serves it. The geometry is `preprocess.scaled_size` / `center_start`,
the functions `predict` uses, compiled into the model.

Formats: `pt2` (the default), a torch.export program: what PyTorch now serves, compiles
(AOTInductor) and lowers (ExecuTorch) from; `torchscript`, deprecated by PyTorch but still
loaded by torch.jit.load and LibTorch (C++), and the only one that takes any image size;
`onnx` for onnxruntime. pt2 and ONNX take any batch size but a fixed height and width (the
checkpoint's resize, or --size): tracing the resize arithmetic fixes which side is the
shorter one and how sizes round, so a free height and width would be specialized to the
example's anyway.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.core.errors import InputError
from pipeline.core.fsutil import atomic_write_bytes
from pipeline.core.stage_options import EXPORT, EXPORT_FORMATS
from pipeline.formats import checkpoint
from pipeline.ml.models import Inference, inference_from
from pipeline.ml.preprocess import center_start, scaled_size

EXPORT_FORMAT = "pipeline-export-1"
METADATA_KEY = "pipeline.json"
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
# Exported and in-memory model must agree this closely on the self-check (float32 noise).
SELF_CHECK_TOLERANCE = 1e-4
MAX_BATCH = 4096  # the largest batch a pt2 program takes


class ServingModel(nn.Module):
    """uint8 N x H x W x 3 RGB images -> N x classes probabilities, preprocessing inside."""

    def __init__(self, inference: Inference) -> None:
        super().__init__()
        self.model = inference.model
        self.side = inference.spec.eval_side
        self.crop = inference.spec.crop
        self.register_buffer("mean", inference.normalization.mean.float().clone())
        self.register_buffer("std", inference.normalization.std.float().clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.pixels(images)
        return self.model((pixels - self.mean) / self.std).softmax(dim=1)

    @torch.jit.export
    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """The crop the network sees, N x 3 x crop x crop, 0-255, as `predict` makes it.

        Resized values are rounded and clamped because predict's Pillow resize stores uint8.
        """
        if images.dim() != 4 or images.shape[3] != 3 or images.dtype != torch.uint8:
            raise ValueError("expected uint8 images N x H x W x 3 (RGB)")
        pixels = images.permute(0, 3, 1, 2).float()
        height, width = pixels.shape[2], pixels.shape[3]
        new_width, new_height = scaled_size(width, height, self.side)
        if new_width != width or new_height != height:
            pixels = nn.functional.interpolate(
                pixels, size=[new_height, new_width], mode="bilinear", align_corners=False,
                antialias=True).round().clamp(0, 255)
        top = center_start(new_height, self.crop)
        left = center_start(new_width, self.crop)
        return pixels[:, :, top:top + self.crop, left:left + self.crop]


@dataclass
class Exported:
    path: Path
    format: str
    metadata: dict[str, Any]


def export(checkpoint_path: Path, fmt: str, out: Path, *,
           size: int | None = EXPORT.size) -> Exported:
    """Write `out` (atomically) and check that it reproduces the in-memory model."""
    if fmt not in EXPORT_FORMATS:
        raise InputError(f"unknown --format {fmt!r}; one of {', '.join(EXPORT_FORMATS)}")
    if size is not None and fmt == "torchscript":
        raise InputError("--size fixes the input size of pt2 and ONNX models; a TorchScript "
                         "model takes any size: drop --size")
    if fmt == "onnx":
        _require_onnx()
    inference = inference_from(checkpoint_path, torch.device("cpu"))
    module = ServingModel(inference).eval()
    side = size or inference.spec.eval_side
    metadata = _metadata(inference, checkpoint_path, fmt, side)
    text = json.dumps(metadata, indent=2)
    example = torch.randint(0, 256, (2, side, side, 3), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(0))
    writers = {"pt2": _pt2, "torchscript": _torchscript, "onnx": _onnx}
    with torch.no_grad():
        data = writers[fmt](module, example, text)
        _self_check(data, fmt, module, example)
    atomic_write_bytes(out, data)
    return Exported(out, fmt, metadata)


def _metadata(inference: Inference, source: Path, fmt: str, side: int) -> dict[str, Any]:
    spec, normalization = inference.spec, inference.normalization
    return {
        "format": EXPORT_FORMAT,
        "exported_as": fmt,
        "checkpoint": str(source),
        "classes": checkpoint.classes_state(inference.classes),
        "input": {"dtype": "uint8", "layout": "NHWC", "channels": "RGB",
                  "height": None if fmt == "torchscript" else side,
                  "width": None if fmt == "torchscript" else side},
        "output": "probabilities, N x classes (softmax), classes in index order",
        "preprocessing": {**spec.to_state(), "eval_side": spec.eval_side,
                          "normalization": normalization.kind},
    }


def _pt2(module: ServingModel, example: torch.Tensor, metadata: str) -> bytes:
    """A torch.export program with a free batch dimension; loads with
    torch.export.load(path).module() and needs nothing of this package."""
    program = torch.export.export(module, (example,), dynamic_shapes=(
        {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={METADATA_KEY: metadata})
    return buffer.getvalue()


def _torchscript(module: ServingModel, example: torch.Tensor, metadata: str) -> bytes:
    buffer = io.BytesIO()
    with _no_jit_deprecation():
        torch.jit.save(torch.jit.script(module), buffer, _extra_files={METADATA_KEY: metadata})
    return buffer.getvalue()


@contextlib.contextmanager
def _no_jit_deprecation() -> Iterator[None]:
    """torch.jit is deprecated in favour of torch.export, but it is still what torch.jit.load
    and LibTorch (C++) serve, which is why it is offered: the warning is not the user's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit")
        yield


def _onnx(module: ServingModel, example: torch.Tensor, metadata: str) -> bytes:
    """torch's dynamo exporter (the TorchScript-based one cannot trace the size arithmetic);
    the batch dimension stays free, height and width are fixed by the example."""
    import onnx

    for name in ("onnxscript", "onnx_ir"):  # their INFO lines narrate every graph pass
        logging.getLogger(name).setLevel(logging.WARNING)
    program = torch.onnx.export(
        module, (example,), dynamo=True, input_names=["images"],
        output_names=["probabilities"], dynamic_shapes=({0: torch.export.Dim("batch")},),
        verbose=False)
    model = program.model_proto
    onnx.helper.set_model_props(model, {METADATA_KEY: metadata})
    return model.SerializeToString()


def _self_check(data: bytes, fmt: str, module: ServingModel, example: torch.Tensor) -> None:
    """Run the exported bytes once: an exporter that silently changed the maths fails here."""
    expected = module(example).numpy()
    if fmt == "pt2":
        got = torch.export.load(io.BytesIO(data)).module()(example).numpy()
    elif fmt == "torchscript":
        with _no_jit_deprecation():
            got = torch.jit.load(io.BytesIO(data))(example).numpy()
    else:
        import onnxruntime

        session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
        got = session.run(None, {"images": example.numpy()})[0]
    difference = float(abs(got - expected).max())
    if difference > SELF_CHECK_TOLERANCE:
        raise RuntimeError(f"the exported {fmt} model differs from the checkpoint's by "
                           f"{difference:.2g} on a test batch; please report this")


def _require_onnx() -> None:
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise InputError(f"--format onnx needs {', '.join(missing)}: pip install "
                         "'synset-pipeline[onnx]' (or export --format pt2)")


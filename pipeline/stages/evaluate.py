"""`pipeline evaluate` and `pipeline predict`: everything they need comes from the checkpoint.

Both evaluate through `metrics.evaluate_loader`, as `finetune`'s validation does. `evaluate`
writes every figure about the evaluation (confusion matrix, misclassified images), so the report
only reads what it wrote.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.core.errors import InputError
from pipeline.core.fsutil import atomic_open, atomic_write_text
from pipeline.core.images import IMAGE_SUFFIXES, ImageDecodeError, decode_image, is_image_path
from pipeline.core.progress import Progress
from pipeline.core.stage_options import EVALUATE, PREDICT
from pipeline.formats import runfolder
from pipeline.formats.manifest import ClassRecord, display_name
from pipeline.ml.data import open_images
from pipeline.ml.metrics import EvalResult, evaluate_loader, make_eval_loader
from pipeline.ml.models import Inference, autocast, inference_from
from pipeline.ml.preprocess import InputSpec, resize_center_crop

MISCLASSIFIED_SHOWN = 12  # in misclassified.png; misclassified.csv lists them all
THUMBNAIL = 64


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class Evaluation:
    metrics: EvalResult
    out: Path

    def summary(self) -> str:
        m = self.metrics
        return (f"{m.count} image(s): top1 {m.top1:.4f}, top5 {m.top5:.4f}, "
                f"loss {m.loss:.4f}; {len(m.skipped)} skipped; reports in {self.out}")


@dataclass(frozen=True)
class _Miss:
    index: int
    path: str
    true: ClassRecord
    predicted: ClassRecord
    probability: float


def evaluate_checkpoint(checkpoint_path: Path, data: Path, out: Path, *,
                        batch_size: int = EVALUATE.batch_size,
                        workers: int = EVALUATE.workers) -> Evaluation:
    """Write OUT/eval.json, per_class.csv, confusion.csv, confusion.png, misclassified.csv
    and misclassified.png."""
    device = default_device()
    inference = inference_from(checkpoint_path, device)
    images = open_images(data, inference.spec, train=False)
    if [c.wnid for c in images.classes] != [c.wnid for c in inference.classes]:
        raise InputError(f"{data} has classes {[c.wnid for c in images.classes]} but "
                         f"{checkpoint_path} was trained on {[c.wnid for c in inference.classes]}")
    result = evaluate_loader(inference.model, make_eval_loader(images, batch_size, workers),
                             inference.normalization, device, len(inference.classes))
    misses = _misclassified(images, result, inference.classes)
    _write_reports(result, inference.classes, out,
                   {"checkpoint": str(checkpoint_path), "data": str(data)})
    _write_misclassified(misses, images, out)
    return Evaluation(result, out)


def _misclassified(images: Any, result: EvalResult, classes: list[ClassRecord]) -> list[_Miss]:
    """The loader keeps data order and leaves out only the skipped images, so the evaluated
    images are the others, in order."""
    skipped = set(result.skipped)
    evaluated = [i for i in range(len(images)) if images.path(i) not in skipped]
    return [_Miss(index, images.path(index), classes[int(images.labels[index])],
                  classes[int(predicted)], float(probability))
            for index, predicted, probability in zip(evaluated, result.predicted,
                                                     result.confidence, strict=True)
            if predicted != images.labels[index]]


def _write_reports(result: EvalResult, classes: list[ClassRecord], out: Path,
                   about: dict[str, str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    wnids = [c.wnid for c in classes]
    accuracy = result.per_class_accuracy()
    atomic_write_text(out / runfolder.EVAL_JSON, json.dumps({
        **about, "images": result.count, "top1": result.top1, "top5": result.top5,
        "loss": result.loss, "skipped": result.skipped,
        "per_class_top1": dict(zip(wnids, accuracy.round(6).tolist(), strict=True)),
        "classes": [{"wnid": c.wnid, "name": c.name} for c in classes],
    }, indent=2) + "\n")
    with atomic_open(out / runfolder.PER_CLASS_CSV, "w", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", "images", "top1"])
        for wnid, total, acc in zip(wnids, result.confusion.sum(axis=1), accuracy, strict=True):
            writer.writerow([wnid, int(total), round(float(acc), 6)])
    with atomic_open(out / runfolder.CONFUSION_CSV, "w", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["true \\ predicted", *wnids])
        for wnid, row in zip(wnids, result.confusion, strict=True):
            writer.writerow([wnid, *row.tolist()])
    plot_confusion(result.confusion, wnids, out / runfolder.CONFUSION_PNG)


def _write_misclassified(misses: list[_Miss], images: Any, out: Path) -> None:
    with atomic_open(out / runfolder.MISCLASSIFIED_CSV, "w", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "path", "true", "predicted", "probability"])
        for miss in misses:
            writer.writerow([miss.index, miss.path, miss.true.wnid, miss.predicted.wnid,
                             round(miss.probability, 6)])
    (out / runfolder.MISCLASSIFIED_PNG).unlink(missing_ok=True)  # none now: no stale figure either
    if misses:
        plot_misclassified(misses[:MISCLASSIFIED_SHOWN], images, out / runfolder.MISCLASSIFIED_PNG)


def plot_misclassified(misses: list[_Miss], images: Any, path: Path) -> None:
    """Thumbnails titled "true wnid -> predicted name probability", six to a row."""
    plt = _pyplot()
    columns = 6
    rows = -(-len(misses) // columns)
    figure, grid = plt.subplots(rows, columns, figsize=(columns * 1.6, rows * 1.9),
                                squeeze=False)
    for axes in grid.flat:
        axes.axis("off")
    for axes, miss in zip(grid.flat, misses, strict=False):
        try:
            axes.imshow(np.asarray(resize_center_crop(images.image(miss.index), THUMBNAIL)))
        except (ImageDecodeError, OSError):
            axes.text(0.5, 0.5, "unreadable", ha="center", fontsize=7)
        axes.set_title(f"{miss.true.wnid}\n→ {miss.predicted.display_name[:14]} "
                       f"{miss.probability:.0%}", fontsize=7)
    figure.tight_layout()
    _save(figure, path, dpi=90)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def _save(figure: Any, path: Path, dpi: int) -> None:
    plt = _pyplot()
    with atomic_open(path) as handle:
        figure.savefig(handle, format="png", dpi=dpi)
    plt.close(figure)


def plot_confusion(confusion: np.ndarray, wnids: list[str], path: Path) -> None:
    plt = _pyplot()

    size = max(4.0, 0.5 * len(wnids) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    totals = confusion.sum(axis=1, keepdims=True)
    shares = np.divide(confusion, totals, out=np.zeros(confusion.shape), where=totals > 0)
    axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(len(wnids)), wnids, rotation=90)
    axes.set_yticks(range(len(wnids)), wnids)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    for (row, col), count in np.ndenumerate(confusion):
        if count:
            axes.text(col, row, str(count), ha="center", va="center", fontsize=8,
                      color="white" if shares[row, col] > 0.5 else "black")
    figure.tight_layout()
    _save(figure, path, dpi=100)


@dataclass
class Prediction:
    path: Path
    top: list[tuple[float, str, str]]  # (probability, wnid, name)
    error: str = ""

    def summary(self) -> str:
        """One line: the path, then the top classes with probabilities, or the error."""
        if self.error:
            return f"{self.path}\terror: {self.error}"
        return f"{self.path}\t" + "  ".join(f"{p:.3f} {wnid} ({display_name(name)})"
                                            for p, wnid, name in self.top)


def predict(checkpoint_path: Path, images: list[Path], top_k: int = PREDICT.top_k, *,
            batch_size: int = PREDICT.batch_size, workers: int = PREDICT.workers,
            precision: str = PREDICT.precision) -> list[Prediction]:
    inference = _inference(checkpoint_path, precision)
    return list(_predictions(inference, images, top_k, batch_size, workers, precision))


def _inference(checkpoint_path: Path, precision: str) -> Inference:
    device = default_device()
    if precision == "fp16" and device.type != "cuda":
        raise InputError("--precision fp16 needs a CUDA GPU; on CPU use bf16 or fp32")
    return inference_from(checkpoint_path, device)


class _ImageFiles(Dataset):
    """Image files decoded and cropped as evaluation does, in loader workers; a file that
    cannot be read is its error, not a failure."""

    def __init__(self, paths: list[Path], spec: InputSpec) -> None:
        self.paths = np.array([str(path) for path in paths])  # shared pages after the fork
        self.spec = spec

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            image = decode_image(Path(self.paths[index]), min_side=self.spec.decode_side)
        except (ImageDecodeError, OSError) as exc:
            return index, None, str(exc)
        pixels = torch.from_numpy(self.spec.eval_pixels(image)).permute(2, 0, 1).contiguous()
        return index, pixels, ""


def _collate_files(samples: list[tuple[int, torch.Tensor | None, str]]
                   ) -> tuple[list[int], torch.Tensor | None, list[str]]:
    good = [pixels for _, pixels, _ in samples if pixels is not None]
    return ([index for index, _, _ in samples], torch.stack(good) if good else None,
            [error for _, _, error in samples])


@torch.no_grad()
def _predictions(inference: Inference, images: list[Path], top_k: int, batch_size: int,
                 workers: int, precision: str) -> Iterator[Prediction]:
    """One prediction per image, in order, as each batch is made (a folder of thousands
    streams to its CSV): files decode in loader workers while the model runs whole batches,
    channels-last (oneDNN's fast layout for convolutions on CPU)."""
    device = next(inference.model.parameters()).device
    model = inference.model.to(memory_format=torch.channels_last)
    k = min(top_k, len(inference.classes))
    loader = DataLoader(_ImageFiles(images, inference.spec), batch_size=batch_size,
                        num_workers=workers if len(images) > batch_size else 0,
                        collate_fn=_collate_files)
    for indices, pixels, errors in loader:
        tops = iter(())
        if pixels is not None:
            inputs = inference.normalization(pixels.to(device))
            with autocast(precision, device):
                logits = model(inputs.contiguous(memory_format=torch.channels_last))
            probabilities, classes = logits.float().softmax(dim=1).topk(k)
            tops = iter(zip(probabilities.tolist(), classes.tolist(), strict=True))
        for index, error in zip(indices, errors, strict=True):
            if error:
                yield Prediction(images[index], [], error)
                continue
            top_p, top_i = next(tops)
            yield Prediction(images[index], [
                (float(p), inference.classes[i].wnid, inference.classes[i].name)
                for p, i in zip(top_p, top_i, strict=True)])


@dataclass(frozen=True)
class PredictionsFile:
    path: Path
    count: int
    failed: int

    def summary(self) -> str:
        failed = (f"; {self.failed} could not be read (see the error column)" if self.failed
                  else "")
        return f"wrote {self.count} prediction(s) to {self.path}{failed}"


def predict_to_csv(checkpoint_path: Path, inputs: list[Path], out: Path,
                   top_k: int = PREDICT.top_k, *, batch_size: int = PREDICT.batch_size,
                   workers: int = PREDICT.workers,
                   precision: str = PREDICT.precision) -> PredictionsFile:
    """Batch mode: files and folders (every image under them) into one CSV, with progress.

    An unreadable image is a row with its error, not a failure: in a folder of thousands a few
    broken files are expected, and the CSV says which.
    """
    images = expand_images(inputs)
    inference = _inference(checkpoint_path, precision)
    k = min(top_k, len(inference.classes))
    progress = Progress("predict", total=len(images))
    count = failed = 0
    with atomic_open(out, "w", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", *(f"{column}_{rank}" for rank in range(1, k + 1)
                                   for column in ("class", "name", "probability")), "error"])
        for prediction in _predictions(inference, images, k, batch_size, workers,
                                       precision):
            top = [value for p, wnid, name in prediction.top for value in (wnid, name, f"{p:.6f}")]
            writer.writerow([str(prediction.path), *top, *[""] * (3 * k - len(top)),
                             prediction.error])
            count += 1
            failed += bool(prediction.error)
            progress.update(count="failed" if prediction.error else None)
    progress.close()
    return PredictionsFile(out, count, failed)


def expand_images(inputs: list[Path]) -> list[Path]:
    """Files as given; a folder becomes every image file under it, sorted."""
    images: list[Path] = []
    for path in inputs:
        if not path.is_dir():
            images.append(path)
            continue
        found = sorted(p for p in path.rglob("*") if p.is_file() and is_image_path(p))
        if not found:
            raise InputError(f"{path} holds no image files (looked for "
                             f"{', '.join(sorted(IMAGE_SUFFIXES))} in it and its subfolders)")
        images.extend(found)
    return images

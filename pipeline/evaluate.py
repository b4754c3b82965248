"""`pipeline evaluate` and `pipeline predict`: everything they need comes from the checkpoint.

Both evaluate through `metrics.evaluate_loader`, as `finetune`'s validation does. `evaluate`
writes every figure about the evaluation (confusion matrix, misclassified images), so the report
only reads what it wrote.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.data import open_images
from pipeline.errors import InputError
from pipeline.fsutil import atomic_open, atomic_write_text
from pipeline.images import ImageDecodeError, decode_image
from pipeline.manifest import ClassRecord, display_name
from pipeline.metrics import EvalResult, evaluate_loader, make_eval_loader
from pipeline.models import inference_from
from pipeline.preprocess import resize_center_crop
from pipeline.stage_options import EVALUATE

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
    atomic_write_text(out / "eval.json", json.dumps({
        **about, "images": result.count, "top1": result.top1, "top5": result.top5,
        "loss": result.loss, "skipped": result.skipped,
        "per_class_top1": dict(zip(wnids, accuracy.round(6).tolist(), strict=True)),
        "classes": [{"wnid": c.wnid, "name": c.name} for c in classes],
    }, indent=2) + "\n")
    with atomic_open(out / "per_class.csv", "w", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", "images", "top1"])
        for wnid, total, acc in zip(wnids, result.confusion.sum(axis=1), accuracy, strict=True):
            writer.writerow([wnid, int(total), round(float(acc), 6)])
    with atomic_open(out / "confusion.csv", "w", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["true \\ predicted", *wnids])
        for wnid, row in zip(wnids, result.confusion, strict=True):
            writer.writerow([wnid, *row.tolist()])
    plot_confusion(result.confusion, wnids, out / "confusion.png")


def _write_misclassified(misses: list[_Miss], images: Any, out: Path) -> None:
    with atomic_open(out / "misclassified.csv", "w", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "path", "true", "predicted", "probability"])
        for miss in misses:
            writer.writerow([miss.index, miss.path, miss.true.wnid, miss.predicted.wnid,
                             round(miss.probability, 6)])
    (out / "misclassified.png").unlink(missing_ok=True)  # none now: no stale figure either
    if misses:
        plot_misclassified(misses[:MISCLASSIFIED_SHOWN], images, out / "misclassified.png")


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


@torch.no_grad()
def predict(checkpoint_path: Path, images: list[Path],
            top_k: int = EVALUATE.top_k) -> list[Prediction]:
    device = default_device()
    inference = inference_from(checkpoint_path, device)
    k = min(top_k, len(inference.classes))
    predictions = []
    for path in images:
        try:
            image = decode_image(path, min_side=inference.spec.decode_side)
        except (ImageDecodeError, OSError) as exc:
            predictions.append(Prediction(path, [], str(exc)))
            continue
        pixels = torch.from_numpy(inference.spec.eval_pixels(image)).permute(2, 0, 1)[None]
        logits = inference.model(inference.normalization(pixels.to(device)))
        probabilities, indices = logits.softmax(dim=1)[0].topk(k)
        predictions.append(Prediction(path, [
            (float(p), inference.classes[i].wnid, inference.classes[i].name)
            for p, i in zip(probabilities.tolist(), indices.tolist(), strict=True)]))
    return predictions

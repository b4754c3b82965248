"""`pipeline evaluate` and `pipeline predict`: everything they need comes from the checkpoint.

Both evaluate through `metrics.evaluate_loader`, as `finetune`'s validation does.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.checkpoint import inference_from
from pipeline.data import open_images
from pipeline.errors import InputError
from pipeline.fsutil import atomic_open, atomic_write_text
from pipeline.images import ImageDecodeError, decode_image
from pipeline.metrics import EvalResult, evaluate_loader, make_eval_loader


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def evaluate_checkpoint(checkpoint_path: Path, data: Path, out: Path, *, batch_size: int = 64,
                        workers: int = 2) -> EvalResult:
    """Write OUT/eval.json, per_class.csv, confusion.csv and confusion.png."""
    device = default_device()
    inference = inference_from(checkpoint_path, device)
    images = open_images(data, inference.spec, train=False)
    if [c.wnid for c in images.classes] != [c.wnid for c in inference.classes]:
        raise InputError(f"{data} has classes {[c.wnid for c in images.classes]} but "
                         f"{checkpoint_path} was trained on {[c.wnid for c in inference.classes]}")
    result = evaluate_loader(inference.model, make_eval_loader(images, batch_size, workers),
                             inference.normalization, device, len(inference.classes))
    _write_reports(result, [c.wnid for c in inference.classes], out,
                   {"checkpoint": str(checkpoint_path), "data": str(data)})
    return result


def _write_reports(result: EvalResult, wnids: list[str], out: Path,
                   about: dict[str, str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    accuracy = result.per_class_accuracy()
    atomic_write_text(out / "eval.json", json.dumps({
        **about, "images": result.count, "top1": result.top1, "top5": result.top5,
        "loss": result.loss, "skipped": result.skipped,
        "per_class_top1": dict(zip(wnids, accuracy.round(6).tolist(), strict=True)),
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


def plot_confusion(confusion: np.ndarray, wnids: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

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
    with atomic_open(path) as handle:
        figure.savefig(handle, format="png", dpi=100)
    plt.close(figure)


@dataclass
class Prediction:
    path: Path
    top: list[tuple[float, str, str]]  # (probability, wnid, name)
    error: str = ""


@torch.no_grad()
def predict(checkpoint_path: Path, images: list[Path], top_k: int = 5) -> list[Prediction]:
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

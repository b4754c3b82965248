"""`pipeline predict` on folders: one CSV row per image under them, with progress."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.core.errors import InputError
from pipeline.stages.evaluate import predict
from pipeline.stages.finetune import FinetuneConfig, finetune
from pipeline.stages.label import label

from imagefiles import colour_dataset, write_image

pytestmark = pytest.mark.slow  # trains a checkpoint, runs the CLI


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("predict")
    colour_dataset(base / "raw", per_class=8)
    label(base / "raw", base / "manifests", val_ratio=0.25)
    finetune(FinetuneConfig(train=base / "manifests" / "train.txt", weights="none", epochs=1,
                            max_steps=1, crop=64, resize=72, batch_size=8, workers=0,
                            out=base / "run"))
    return base / "run" / "checkpoint.pt"


def run_predict(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "predict", *args],
                          capture_output=True, text=True, timeout=120, cwd=cwd)


def test_a_folder_becomes_a_csv_with_the_same_figures_as_predict(checkpoint, tmp_path):
    photos = tmp_path / "photos"
    good = [write_image(photos / "b.png", 1, "PNG"),
            write_image(photos / "a.jpg", 2, size=(120, 90)),
            write_image(photos / "nested" / "c.png", 3, "PNG", size=(50, 70))]
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (photos / "notes.txt").write_text("not an image")
    done = run_predict(str(checkpoint), "photos", "--top-k", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == ("wrote 4 prediction(s) to predictions.csv; 1 could not be "
                                   "read (see the error column)")
    assert "predict" in done.stderr  # the progress line
    with open(tmp_path / "predictions.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["path", "class_1", "name_1", "probability_1", "class_2", "name_2",
                             "probability_2", "error"]
    assert [row["path"] for row in rows] == [
        "photos/a.jpg", "photos/b.png", "photos/broken.jpg", "photos/nested/c.png"]
    broken = rows[2]
    assert broken["error"] and broken["class_1"] == broken["probability_2"] == ""
    expected = {p.path.name: p for p in predict(checkpoint, sorted(good), top_k=2)}
    for row in rows[:2] + rows[3:]:
        top = expected[Path(row["path"]).name].top
        assert row["error"] == ""
        assert [row["class_1"], row["class_2"]] == [wnid for _, wnid, _ in top]
        assert [row["name_1"], row["name_2"]] == [name for _, _, name in top]
        assert [float(row["probability_1"]), float(row["probability_2"])] == pytest.approx(
            [p for p, _, _ in top], abs=1e-6)


def test_out_takes_files_too_and_an_empty_folder_is_one_line(checkpoint, tmp_path):
    image = write_image(tmp_path / "one.png", 4, "PNG")
    done = run_predict(str(checkpoint), str(image), "--top-k", "9", "--out", "p/one.csv",
                       cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "p" / "one.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 and rows[0]["class_3"] and "class_4" not in rows[0]  # 3 classes
    (tmp_path / "empty").mkdir()
    done = run_predict(str(checkpoint), "empty", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("error: empty holds no image files")
    assert done.stderr.strip().count("\n") == 0


def test_batches_in_loader_workers_give_the_one_at_a_time_predictions(checkpoint, tmp_path):
    """Batched (in worker processes, an unreadable file mid-batch) and one image at a time
    agree image by image, in the order given."""
    paths = [write_image(tmp_path / f"{i}.png", i, "PNG", size=(60 + 7 * i, 90 - 3 * i))
             for i in range(11)]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    paths.insert(5, broken)
    one_by_one = predict(checkpoint, paths, top_k=3, batch_size=1, workers=0)
    batched = predict(checkpoint, paths, top_k=3, batch_size=4, workers=2)
    assert [p.path for p in batched] == paths == [p.path for p in one_by_one]
    assert batched[5].error and not batched[5].top
    for alone, together in zip(one_by_one, batched, strict=True):
        assert [wnid for _, wnid, _ in alone.top] == [wnid for _, wnid, _ in together.top]
        assert [p for p, _, _ in alone.top] == pytest.approx([p for p, _, _ in together.top],
                                                              abs=1e-5)


def test_bf16_predicts_about_the_same_and_fp16_needs_a_gpu(checkpoint, tmp_path):
    paths = [write_image(tmp_path / f"{i}.png", i, "PNG") for i in range(5)]
    full = predict(checkpoint, paths, top_k=3, workers=0)
    half = predict(checkpoint, paths, top_k=3, workers=0, precision="bf16")
    for exact, rough in zip(full, half, strict=True):
        by_class = {wnid: p for p, wnid, _ in rough.top}
        for p, wnid, _ in exact.top:
            assert abs(by_class.get(wnid, 0.0) - p) < 0.05
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="fp16 needs a CUDA GPU"):
            predict(checkpoint, paths, precision="fp16")

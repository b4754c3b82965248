"""`pipeline finetune --tensorboard DIR`: the event file holds log.csv's figures per epoch."""

import csv
import subprocess
import sys

import pytest

from pipeline.stages.finetune import FinetuneConfig, finetune
from pipeline.stages.label import label

from imagefiles import colour_dataset

pytestmark = pytest.mark.slow  # trains, runs the CLI


def test_event_file_holds_every_log_csv_figure_per_epoch(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing"
                                            ".event_accumulator")
    colour_dataset(tmp_path / "raw", per_class=8)
    label(tmp_path / "raw", tmp_path / "manifests", val_ratio=0.25)
    finetune(FinetuneConfig(train=tmp_path / "manifests" / "train.txt",
                            val=tmp_path / "manifests" / "val.txt", weights="none", epochs=2,
                            crop=64, resize=72, batch_size=8, workers=0, max_steps=2,
                            out=tmp_path / "run", tensorboard=tmp_path / "tb"))
    with open(tmp_path / "run" / "log.csv", newline="") as handle:
        log = list(csv.DictReader(handle))
    events = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    figures = [field for field in log[0] if field != "epoch"]
    assert {"lr", "images_per_s", "train_loss", "val_top1"} <= set(figures)
    assert sorted(events.Tags()["scalars"]) == sorted(figures)
    for field in figures:
        logged = [(event.step, event.value) for event in events.Scalars(field)]
        assert logged == [(int(row["epoch"]), pytest.approx(float(row[field]), rel=1e-5,
                                                            abs=1e-6)) for row in log], field


def test_missing_tensorboard_is_one_line_and_exit_2_before_any_work(tmp_path):
    hide = "import sys; sys.modules['tensorboard'] = None; from pipeline.cli import main; main()"
    done = subprocess.run([sys.executable, "-c", hide, "finetune", "--train", "nowhere.txt",
                           "--tensorboard", str(tmp_path / "tb"), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: --tensorboard needs the tensorboard package: pip "
                                   "install 'synset-pipeline[tensorboard]' (or drop "
                                   "--tensorboard)")
    assert not (tmp_path / "r").exists()

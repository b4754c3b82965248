"""Real training steps on tiny images with locally created weights."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from pipeline.core.errors import InputError
from pipeline.formats.checkpoint import load as load_checkpoint
from pipeline.formats.manifest import read_manifest
from pipeline.ml.models import build_model, imagenet_weights_file
from pipeline.stages.evaluate import evaluate_checkpoint, predict
from pipeline.stages.finetune import FinetuneConfig, finetune
from pipeline.stages.label import label
from pipeline.stages.pack import pack

from imagefiles import colour_dataset

SMALL = {"crop": 64, "resize": 72, "batch_size": 8, "workers": 0}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("data")
    colour_dataset(base / "raw")
    label(base / "raw", base / "manifests", val_ratio=0.25)
    return base / "manifests"


def read_log(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def config(dataset: Path, out: Path, **overrides) -> FinetuneConfig:
    values = {"train": dataset / "train.txt", "val": dataset / "val.txt", "weights": "none",
              "epochs": 1, "out": out, **SMALL, **overrides}
    return FinetuneConfig(**values)


@pytest.mark.slow
def test_frozen_layers_stay_bit_identical_and_the_rest_learn(dataset, tmp_path):
    torch.manual_seed(1)
    start = torchvision.models.alexnet(num_classes=3)
    torch.save(start.state_dict(), tmp_path / "start.pth")  # a torchvision-style .pth
    finetune(config(dataset, tmp_path / "run", weights=str(tmp_path / "start.pth"),
                    freeze_until="conv4", max_steps=2, lr=0.05))
    trained = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["model"]
    before = start.state_dict()
    for name in ("features.0.weight", "features.3.weight", "features.6.weight",
                 "features.8.weight", "features.8.bias"):
        assert torch.equal(trained[name], before[name]), name
    for name in ("features.10.weight", "classifier.1.weight", "classifier.4.weight"):
        assert not torch.equal(trained[name], before[name]), name


@pytest.mark.slow
def test_frozen_batchnorm_statistics_do_not_move(dataset, tmp_path):
    finetune(config(dataset, tmp_path / "run", arch="vgg11_bn", freeze_until="conv2",
                    crop=32, resize=36, max_steps=1))
    fresh = build_model("vgg11_bn", 3, "none").state_dict()  # running stats start at 0 / 1
    trained = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["model"]
    for bn in ("features.1", "features.5"):  # conv1_1's and conv2_1's BatchNorm: frozen
        assert torch.equal(trained[f"{bn}.running_mean"], fresh[f"{bn}.running_mean"])
        assert trained[f"{bn}.num_batches_tracked"] == 0
    assert not torch.equal(trained["features.9.running_mean"], fresh["features.9.running_mean"])


@pytest.mark.slow
def test_loss_falls_and_accuracy_beats_chance(dataset, tmp_path):
    metrics = finetune(config(dataset, tmp_path / "run", epochs=4, lr=0.02,
                              freeze_until=None, schedule="cosine"))
    rows = list(read_log(tmp_path / "run" / "log.csv"))
    assert len(rows) == 4
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert metrics["val_top1"] > 0.5  # chance is 1/3
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs"] == 4
    assert {"checkpoint.pt", "best.pt", "config.json", "log.csv"} <= set(
        os.listdir(tmp_path / "run"))
    top1 = [float(row["val_top1"]) for row in rows]
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["epoch"] == top1.index(max(top1)) + 1 and best["best_top1"] == max(top1)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 4


@pytest.mark.slow
def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(dataset, tmp_path):
    common = {"epochs": 2, "max_steps": 2, "seed": 5, "freeze_until": "conv3"}
    finetune(config(dataset, tmp_path / "straight", **common))
    first_half = config(dataset, tmp_path / "resumed", **{**common, "epochs": 1})
    finetune(first_half)
    finetune(config(dataset, tmp_path / "resumed", **common, resume=True))
    straight = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    assert resumed["epoch"] == straight["epoch"] == 2
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    log = list(read_log(tmp_path / "resumed" / "log.csv"))
    assert [row["epoch"] for row in log] == ["1", "2"]


@pytest.mark.slow
def test_an_unreadable_image_mid_epoch_is_skipped_and_counted(dataset, tmp_path):
    copy = tmp_path / "m"
    raw = read_manifest(dataset / "train.txt")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    copy.mkdir()
    for name in ("labels.txt", "val.txt"):
        (copy / name).write_text((dataset / name).read_text())
    (copy / "root.txt").write_text("/\n")
    lines = [f"{raw.root / p} {lbl}" for p, lbl in zip(raw.paths, raw.labels, strict=True)]
    lines.insert(3, f"{broken} 0")
    (copy / "train.txt").write_text("\n".join(lines) + "\n")
    (copy / "val.txt").write_text("\n".join(lines[:6]) + "\n")
    finetune(config(copy, tmp_path / "run", max_steps=None, freeze_until="fc6"))
    row = read_log(tmp_path / "run" / "log.csv")[0]
    assert row["skipped"] == "1"
    assert int(row["train_images"]) == len(raw)  # every good image of the epoch was used


@pytest.mark.slow
def test_weights_path_round_trip_and_a_run_folder_is_never_overwritten(dataset, tmp_path):
    finetune(config(dataset, tmp_path / "run", max_steps=1))
    saved = load_checkpoint(tmp_path / "run" / "best.pt")
    model = build_model("alexnet", 5, str(tmp_path / "run" / "best.pt"))
    assert torch.equal(model.state_dict()["features.0.weight"], saved["model"]["features.0.weight"])
    assert model.classifier[6].out_features == 5
    with pytest.raises(InputError, match="already holds a run"):
        finetune(config(dataset, tmp_path / "run", max_steps=1))
    with pytest.raises(InputError, match="does not fit"):
        build_model("vgg11", 3, str(tmp_path / "run" / "best.pt"))


def test_imagenet_weights_offline_error_names_the_file_and_cache_is_used(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    expected = imagenet_weights_file("alexnet")
    assert expected.parent == tmp_path / "torch" / "hub" / "checkpoints"
    with pytest.raises(InputError) as info:
        build_model("alexnet", 3, "imagenet")
    assert str(expected) in str(info.value) and "TORCH_HOME" in str(info.value)
    expected.parent.mkdir(parents=True, exist_ok=True)
    reference = torchvision.models.alexnet()
    torch.save(reference.state_dict(), expected)
    model = build_model("alexnet", 3, "imagenet")
    assert torch.equal(model.features[0].weight, reference.features[0].weight)


@pytest.mark.slow
def test_evaluate_and_predict_agree_and_h5_trains(dataset, tmp_path):
    finetune(config(dataset, tmp_path / "run", epochs=2, lr=0.02, freeze_until=None))
    result = evaluate_checkpoint(tmp_path / "run" / "best.pt", dataset / "val.txt",
                                 tmp_path / "eval", workers=0).metrics
    manifest = read_manifest(dataset / "val.txt")
    predictions = predict(tmp_path / "run" / "best.pt",
                          [manifest.absolute(i) for i in range(len(manifest))], top_k=2)
    wnids = [line.split()[1] for line in (dataset / "labels.txt").read_text().splitlines()]
    hits = [p.top[0][1] == wnids[lbl] for p, lbl in zip(predictions, manifest.labels,
                                                         strict=True)]
    assert result.count == len(manifest)
    assert result.top1 == pytest.approx(sum(hits) / len(hits))
    assert (tmp_path / "eval" / "confusion.png").stat().st_size > 0
    assert result.confusion.sum() == len(manifest)
    with open(tmp_path / "eval" / "misclassified.csv", newline="") as handle:
        missed = {row["path"]: row["predicted"] for row in csv.DictReader(handle)}
    assert missed == {str(manifest.paths[i]): p.top[0][1]
                      for i, (p, hit) in enumerate(zip(predictions, hits, strict=True)) if not hit}
    pack(dataset / "train.txt", tmp_path / "train.h5", size=72)
    pack(dataset / "val.txt", tmp_path / "val.h5", size=72)
    metrics = finetune(config(dataset, tmp_path / "h5run", train=tmp_path / "train.h5",
                              val=tmp_path / "val.h5", max_steps=2, workers=2))
    assert metrics["train_images"] == 16


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["--freeze-until", "conv9"], "valid names: conv1, conv2"),
    (["--weights", "missing.pth"], "no such file"),
    (["--precision", "fp16"], "needs a CUDA GPU"),
])
def test_cli_bad_input_is_one_line_and_exit_2(dataset, tmp_path, args, message):
    if "fp16" in args and torch.cuda.is_available():
        pytest.skip("fp16 is valid with CUDA")
    command = [sys.executable, "-m", "pipeline", "finetune", "--train",
               str(dataset / "train.txt"), "--weights", "none", "--out", str(tmp_path / "r"),
               *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0


@pytest.mark.slow
def test_ddp_two_processes_run_an_epoch(dataset, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "pipeline", "-q", "finetune",
               "--train", str(dataset / "train.txt"), "--val", str(dataset / "val.txt"),
               "--weights", "none", "--epochs", "1", "--crop", "64", "--resize", "72",
               "--batch-size", "4", "--workers", "0", "--out", str(tmp_path / "ddp")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = list(read_log(tmp_path / "ddp" / "log.csv"))
    assert len(rows) == 1  # only rank 0 writes
    assert int(rows[0]["train_images"]) == 36  # summed over both ranks' halves
    assert done.stdout.count('"best_val_top1"') == 1  # only rank 0 reports


def test_mean_file_normalizes_by_its_own_statistics_and_never_guesses(dataset, tmp_path):
    from pipeline.ml.normalization import Normalization
    from pipeline.ml.preprocess import InputSpec
    from pipeline.stages.mean import compute_mean

    compute_mean(dataset / "train.txt", tmp_path / "mean.npy", size=72, workers=1)
    spec = InputSpec(crop=64, resize=72)
    normalization = Normalization.from_mean_file(tmp_path / "mean.npy", spec)
    stats = json.loads((tmp_path / "mean.json").read_text())
    assert normalization.kind == "mean_image" and normalization.mean.shape == (3, 64, 64)
    assert torch.allclose(normalization.std.flatten(), torch.tensor(stats["std"]))
    assert float(normalization.std.min()) > 20  # 0-255 units: a std of 1 would be 60x off
    (tmp_path / "mean.json").unlink()
    with pytest.raises(InputError, match="statistics .*mean.json are missing"):
        Normalization.from_mean_file(tmp_path / "mean.npy", spec)

"""The frozen-trunk feature cache: same training as without it, keyed, rebuilt when broken,
resumable, exact on resume, and the model that comes out is an ordinary one."""

import copy
import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from pipeline.core.errors import InputError
from pipeline.formats.checkpoint import load as load_checkpoint
from pipeline.ml.data import EpochSampler, make_loader, open_images
from pipeline.ml.models import build_model, freeze, frozen_layers, layer_table, train_mode
from pipeline.ml.normalization import Normalization
from pipeline.ml.preprocess import InputSpec
from pipeline.stages.evaluate import evaluate_checkpoint
from pipeline.stages.finetune import FinetuneConfig, finetune
from pipeline.stages.finetune import cache as cache_module
from pipeline.stages.finetune.cache import FeatureCache, features_to_input, split_model
from pipeline.stages.finetune.loop import train_one_epoch
from pipeline.stages.finetune.optim import make_optimizer
from pipeline.stages.label import label
from pipeline.stages.report import build_report

from imagefiles import colour_dataset

pytestmark = pytest.mark.slow  # trains or runs the whole chain

SMALL = {"crop": 64, "resize": 72, "batch_size": 8, "workers": 0}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("cachedata")
    colour_dataset(base / "raw", per_class=12)
    label(base / "raw", base / "manifests", val_ratio=0.25)
    return base / "manifests"


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("weights") / "start.pth"
    torch.save(torchvision.models.alexnet(num_classes=3).state_dict(), path)
    return path


def config(dataset: Path, out: Path, weights: Path, **overrides) -> FinetuneConfig:
    values = {"train": dataset / "train.txt", "val": dataset / "val.txt",
              "weights": str(weights), "freeze_until": "conv4", "epochs": 2, "out": out,
              "lr": 0.02, "cache_dir": out.parent / "caches", **SMALL, **overrides}
    return FinetuneConfig(**values)


def test_one_cached_view_trains_exactly_like_the_same_fixed_view_without_cache(
        dataset, weights, tmp_path):
    """K=1 caches the centre crop; the reference trains live on the centre crop."""
    spec = InputSpec(64, 72)
    settings = config(dataset, tmp_path / "run", weights, cache_views=1, cache_dtype="fp32")
    torch.manual_seed(0)
    live = build_model("alexnet", 3, str(weights))
    cached = copy.deepcopy(live)
    initial = copy.deepcopy(live.state_dict())
    normalization = Normalization.imagenet()

    def prepare(model):
        layers = layer_table(model, "alexnet")
        frozen = frozen_layers(layers, "conv4")
        return frozen, freeze(model, frozen), make_optimizer(model, layers, settings)

    frozen, bns, live_opt = prepare(live)
    centre = open_images(dataset / "train.txt", spec, train=False)
    sampler = EpochSampler(len(centre), shuffle=True, seed=0)
    live_loader = make_loader(centre, sampler, batch_size=8, workers=0)

    frozen_c, bns_c, cached_opt = prepare(cached)
    trunk, head = split_model(cached, frozen_c)
    store = FeatureCache.for_run(settings, trunk, spec, normalization)
    store.ensure(trunk, settings, spec, normalization, torch.device("cpu"))
    features = store.dataset("train", centre.labels, train=True, seed=0)
    cached_sampler = EpochSampler(len(features), shuffle=True, seed=0)
    cached_loader = make_loader(features, cached_sampler, batch_size=8, workers=0)

    common = {"criterion": torch.nn.CrossEntropyLoss(), "precision": "fp32",
              "device": torch.device("cpu"), "steps": len(live_loader),
              "scaler": torch.amp.GradScaler("cuda", enabled=False)}
    torch.manual_seed(123)  # dropout masks: both runs draw the same ones
    for epoch in (1, 2):
        sampler.set_epoch(epoch)
        train_mode(live, bns)
        train_one_epoch(live, live_loader, inputs=normalization, optimizer=live_opt, **common)
    torch.manual_seed(123)
    for epoch in (1, 2):
        cached_sampler.set_epoch(epoch)
        train_mode(head, bns_c)
        train_one_epoch(head, cached_loader, inputs=features_to_input(torch.device("cpu"), False),
                        optimizer=cached_opt, **common)
    for (name, a), (_, b) in zip(live.state_dict().items(), cached.state_dict().items(),
                                 strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    moved = (live.state_dict()["classifier.6.weight"] - initial["classifier.6.weight"]).abs()
    assert moved.max() > 1e-3  # both trained for real: the match is not two idle models


def test_the_cache_is_reused_by_the_same_key_and_never_when_the_key_changes(
        dataset, weights, tmp_path):
    first = finetune(config(dataset, tmp_path / "a", weights, cache_features="on",
                            cache_views=2))["feature_cache"]
    assert not first["reused"] and first["views"] == 2 and first["bytes"] > 0
    # the build pays for itself after as many epochs as it took the frozen layers' time
    per_epoch = first["trunk_seconds_per_epoch"]
    assert per_epoch > 0 and first["break_even_epochs"] >= 1
    epochs, slack = first["break_even_epochs"], 0.005 * first["break_even_epochs"]  # rounding
    assert (epochs - 1) * per_epoch - slack < first["build_seconds"] <= epochs * per_epoch + slack
    again = finetune(config(dataset, tmp_path / "b", weights, cache_features="on",
                            cache_views=2, lr=0.005))["feature_cache"]
    assert again["reused"] and again["folder"] == first["folder"]
    assert again["break_even_epochs"] == 0  # a reused cache costs nothing to build
    other_views = finetune(config(dataset, tmp_path / "c", weights, cache_features="on",
                                  cache_views=3))["feature_cache"]
    assert not other_views["reused"] and other_views["folder"] != first["folder"]
    other_freeze = finetune(config(dataset, tmp_path / "d", weights, cache_features="on",
                                   cache_views=2, freeze_until="conv5"))["feature_cache"]
    assert other_freeze["folder"] not in (first["folder"], other_views["folder"])
    # fc6 frozen cuts where conv5 does (a Dropout comes first): the same trunk, one cache.
    fc6 = finetune(config(dataset, tmp_path / "f", weights, cache_features="on",
                          cache_views=2, freeze_until="fc6"))["feature_cache"]
    assert fc6["reused"] and fc6["folder"] == other_freeze["folder"]
    # The training data changes (one more line): a new key, a new cache.
    manifest = dataset / "train.txt"
    original = manifest.read_text()
    try:
        manifest.write_text(original + original.splitlines()[-1] + "\n")
        changed = finetune(config(dataset, tmp_path / "e", weights, cache_features="on",
                                  cache_views=2))["feature_cache"]
        assert not changed["reused"] and changed["folder"] != first["folder"]
    finally:
        manifest.write_text(original)


def test_a_corrupt_cache_is_rebuilt_with_a_message(dataset, weights, tmp_path, caplog):
    first = finetune(config(dataset, tmp_path / "a", weights, cache_features="on",
                            cache_views=2))["feature_cache"]
    array = Path(first["folder"]) / "train.npy"
    array.write_bytes(array.read_bytes()[: array.stat().st_size // 2])  # torn
    with caplog.at_level(logging.WARNING):
        again = finetune(config(dataset, tmp_path / "b", weights, cache_features="on",
                                cache_views=2))["feature_cache"]
    assert "unusable" in caplog.text and "rebuilding" in caplog.text
    assert not again["reused"] and again["folder"] == first["folder"]
    assert np.load(array, mmap_mode="r").shape[1] == 2


def test_an_interrupted_build_resumes_where_it_stopped(dataset, weights, tmp_path,
                                                        monkeypatch):
    settings = config(dataset, tmp_path / "run", weights, cache_views=3)
    spec, normalization = InputSpec(64, 72), Normalization.imagenet()
    model = build_model("alexnet", 3, str(weights))
    trunk, _ = split_model(model, frozen_layers(layer_table(model, "alexnet"), "conv4"))
    store = FeatureCache.for_run(settings, trunk, spec, normalization)
    monkeypatch.setattr(cache_module, "BUILD_BATCH", 6)
    monkeypatch.setattr(cache_module, "SAVE_EVERY_SECONDS", 0.0)
    calls = {"n": 0}
    original_forward = trunk.forward

    def dies_on_the_fourth_batch(x):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original_forward(x)

    trunk.forward = dies_on_the_fourth_batch
    with pytest.raises(KeyboardInterrupt):
        store.ensure(trunk, settings, spec, normalization, torch.device("cpu"))
    state = json.loads((store.folder / "state.json").read_text())
    assert 0 < state["done"]["train"] < 27
    trunk.forward = original_forward
    resumed = store.ensure(trunk, settings, spec, normalization, torch.device("cpu"))
    assert not resumed.reused
    whole = FeatureCache(tmp_path / "whole", store.key)
    whole.ensure(trunk, settings, spec, normalization, torch.device("cpu"))
    for split in ("train", "val"):
        np.testing.assert_array_equal(np.load(store.folder / f"{split}.npy"),
                                      np.load(whole.folder / f"{split}.npy"))


def test_resume_from_the_cache_is_exact_and_the_model_needs_no_cache(dataset, weights,
                                                                     tmp_path):
    whole = config(dataset, tmp_path / "whole", "none", cache_features="on", cache_views=3,
                   epochs=3, lr=0.01)
    finetune(whole)
    half = dataclasses.replace(whole, out=tmp_path / "half", epochs=1)
    finetune(half)
    finetune(dataclasses.replace(half, epochs=3, resume=True))
    a = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "half" / "checkpoint.pt")["model"]
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # An ordinary checkpoint: evaluate reads images, not the cache, and agrees with training.
    result = evaluate_checkpoint(tmp_path / "whole" / "best.pt", dataset / "val.txt",
                                 tmp_path / "whole" / "eval-val", workers=0).metrics
    metrics = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert result.top1 == pytest.approx(metrics["best_val_top1"], abs=1 / result.count + 1e-9)
    assert metrics["best_val_top1"] > 0.5  # three colours: it learns
    page = build_report(tmp_path / "whole").read_text()
    assert "Feature cache: used (3 views per image" in page
    assert "top-5" not in page  # three classes: top-5 would always be 100%
    assert all(f"<td>n0000000{c}</td>" in page for c in (1, 2, 3))  # per-class accuracy


def test_frozen_batchnorm_keeps_its_statistics_with_the_cache(dataset, tmp_path):
    finetune(FinetuneConfig(train=dataset / "train.txt", val=dataset / "val.txt",
                            arch="vgg11_bn", weights="none", freeze_until="conv2", epochs=1,
                            crop=32, resize=36, batch_size=8, workers=0, out=tmp_path / "run",
                            cache_features="on", cache_views=2, cache_dir=tmp_path / "c"))
    fresh = build_model("vgg11_bn", 3, "none").state_dict()
    trained = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["model"]
    for bn in ("features.1", "features.5"):  # conv1_1's and conv2_1's BatchNorm: frozen
        assert torch.equal(trained[f"{bn}.running_mean"], fresh[f"{bn}.running_mean"])
        assert trained[f"{bn}.num_batches_tracked"] == 0
    assert trained["features.9.num_batches_tracked"] > 0  # conv3_1's: trained


@pytest.mark.parametrize("arch, until", [("alexnet", "conv1"), ("alexnet", "fc7"),
                                         ("vgg11", "conv5_2"), ("vgg13_bn", "conv3")])
def test_head_after_trunk_is_the_whole_model(arch, until):
    model = build_model(arch, 4, "none").eval()
    frozen = frozen_layers(layer_table(model, arch), until)
    trunk, head = split_model(model, frozen)
    assert not any(isinstance(m, torch.nn.Dropout) for m in trunk)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(head(trunk(pixels)), model(pixels))


def test_nothing_frozen_is_refused_clearly(dataset, tmp_path):
    with pytest.raises(InputError, match="nothing is frozen"):
        finetune(FinetuneConfig(train=dataset / "train.txt", freeze_until=None,
                                cache_features="on", out=tmp_path / "run"))


def test_the_auto_probe_weighs_the_rest_of_the_build_against_the_epochs_planned(monkeypatch):
    """1,000 images, 8 views each, built at 12 ms a view; an epoch from the cache saves 10 ms
    of frozen layers per image: what is left once the probe has seen ~10 s (7,040 views,
    84.5 s) pays off after 9 epochs."""
    clock = [0.0]
    monkeypatch.setattr(cache_module.time, "monotonic", lambda: clock[0])

    def probe(epochs: int) -> cache_module._Probe:
        checked = cache_module._Probe(cache_module.BuildPlan(epochs, images_per_epoch=1000),
                                      views_left=8000)
        for _ in range(cache_module.PROBE_BATCHES + 12):  # 64 views, 64 images a batch
            clock[0] += 64 * 0.012
            checked.batch_done(64, 64, 64 * 0.010)
            if checked.decided:
                break
        return checked

    with pytest.raises(cache_module.NotWorthBuilding, match="pays off after 9 epoch"):
        probe(epochs=9)
    assert probe(epochs=10).decided  # worth it: no exception, the build goes on


def test_auto_builds_the_cache_only_when_the_planned_epochs_repay_it(
        dataset, weights, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(cache_module, "BUILD_BATCH", 8)  # 225 views: the probe decides early
    monkeypatch.setattr(cache_module, "PROBE_BATCHES", 2)
    monkeypatch.setattr(cache_module, "PROBE_SECONDS", 0.0)
    with caplog.at_level(logging.INFO):
        short = finetune(config(dataset, tmp_path / "short", weights, cache_features="auto",
                                cache_views=8, epochs=1))
    assert "feature_cache" not in short and "training from images instead" in caplog.text
    assert not list((tmp_path / "caches").glob("*/key.json"))  # its started folder is gone
    caplog.clear()
    with caplog.at_level(logging.INFO):
        long = finetune(config(dataset, tmp_path / "long", weights, cache_features="auto",
                               cache_views=8, epochs=100, max_steps=1))
    assert "building it" in caplog.text
    cache = long["feature_cache"]
    assert not cache["reused"] and 1 <= cache["break_even_epochs"] < 100
    # A finished cache is always used, whatever the epochs.
    again = finetune(config(dataset, tmp_path / "again", weights, cache_features="auto",
                            cache_views=8, epochs=1))
    assert again["feature_cache"]["reused"]

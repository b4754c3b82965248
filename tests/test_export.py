"""`pipeline export`: the exported files, served without `pipeline`, agree with `pipeline predict`.

The checkpoints are real (a few training steps of `finetune` on tiny images), the images are
real files decoded the way a server would (Pillow, RGB), and the exported files run in
torch.jit.load and onnxruntime.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.ml.models import inference_from
from pipeline.ml.preprocess import InputSpec
from pipeline.stages.evaluate import predict
from pipeline.stages.export import METADATA_KEY, export
from pipeline.stages.finetune import FinetuneConfig, finetune
from pipeline.stages.label import label
from pipeline.stages.mean import compute_mean

from imagefiles import colour_dataset, write_image

SPEC = InputSpec(crop=64, resize=72)
# Pillow's bilinear resize (fixed-point, uint8 result) and torch's antialiased one (float,
# rounded) may differ by one grey level on a pixel; through the normalization (std ~60) and a
# small network that moved a probability by at most 3e-4 when measured.
PROBABILITY_TOLERANCE = 2e-3
pytestmark = [
    pytest.mark.slow,  # trains the models it exports
    # torch.jit.load is deprecated in favour of torch.export; serving TorchScript is the point.
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning"),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two real checkpoints: ImageNet channel statistics, and a dataset mean image."""
    base = tmp_path_factory.mktemp("export")
    colour_dataset(base / "raw")
    label(base / "raw", base / "manifests", val_ratio=0.25)
    compute_mean(base / "manifests" / "train.txt", base / "mean.npy", size=SPEC.resize,
                 workers=1)
    checkpoints = {}
    for name, mean in (("channel", "imagenet"), ("mean_image", str(base / "mean.npy"))):
        finetune(FinetuneConfig(train=base / "manifests" / "train.txt", weights="none",
                                epochs=1, max_steps=4, lr=0.05, crop=SPEC.crop,
                                resize=SPEC.resize, mean=mean, batch_size=8, workers=0,
                                out=base / name))
        checkpoints[name] = base / name / "checkpoint.pt"
    return checkpoints


def images(folder: Path) -> list[Path]:
    """Smooth and noisy pictures: no resize, down- and up-scaling, PNG and JPEG (JPEGs small
    enough that predict decodes them at full scale, as a server's plain decode does)."""
    made = [write_image(folder / f"pattern_{w}x{h}.{fmt.lower()}", seed=w + h, fmt=fmt,
                        size=(w, h))
            for w, h, fmt in ((72, 72, "PNG"), (80, 64, "PNG"), (64, 90, "PNG"),
                              (300, 200, "PNG"), (120, 100, "JPEG"))]
    noise = np.random.default_rng(0).integers(0, 256, (150, 200, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "noise_200x150.png")
    return [*made, folder / "noise_200x150.png"]


def served_input(path: Path) -> torch.Tensor:
    """What a server has: the file decoded by Pillow, 1 x H x W x 3 uint8."""
    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB")))[None]


def predicted(checkpoint: Path, paths: list[Path], wnids: list[str]) -> np.ndarray:
    """`pipeline predict`'s probabilities, N x classes in the checkpoint's class order."""
    rows = []
    for prediction in predict(checkpoint, paths, top_k=len(wnids)):
        assert not prediction.error
        by_wnid = {wnid: p for p, wnid, _ in prediction.top}
        rows.append([by_wnid[w] for w in wnids])
    return np.array(rows)


@pytest.fixture(scope="module")
def torchscript_channel(runs, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("torchscript") / "model.pt"
    export(runs["channel"], "torchscript", path)
    return path


def load_torchscript(path: Path) -> tuple[torch.jit.ScriptModule, dict]:
    extra = {METADATA_KEY: ""}
    module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module, json.loads(extra[METADATA_KEY])


@pytest.mark.parametrize("normalization", ["channel", "mean_image"])
def test_torchscript_takes_any_size_and_matches_predict(runs, tmp_path, normalization,
                                                        torchscript_channel):
    checkpoint = runs[normalization]
    exported = torchscript_channel
    if normalization != "channel":
        exported = export(checkpoint, "torchscript", tmp_path / "model.pt").path
    module, metadata = load_torchscript(exported)
    assert metadata["format"] == "pipeline-export-1"
    wnids = [c["wnid"] for c in metadata["classes"]]
    assert wnids == [c.wnid for c in inference_from(checkpoint, torch.device("cpu")).classes]
    assert metadata["preprocessing"]["normalization"] == normalization
    paths = images(tmp_path / "images")
    with torch.no_grad():
        served = np.concatenate([module(served_input(p)).numpy() for p in paths])
    expected = predicted(checkpoint, paths, wnids)
    assert served.shape == (len(paths), 3)
    np.testing.assert_allclose(served.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(served, expected, atol=PROBABILITY_TOLERANCE)
    assert np.ptp(expected) > 0.05  # the model is not uniform, so agreement means something


def test_torchscript_crop_is_predicts_within_one_grey_level(torchscript_channel, tmp_path):
    """The exported preprocessing alone (its `pixels` method) against predict's pixels."""
    module, _ = load_torchscript(torchscript_channel)
    for path in images(tmp_path / "images"):
        with Image.open(path) as image:
            expected = SPEC.eval_pixels(image.convert("RGB")).astype(np.float32)
        got = module.pixels(served_input(path))[0].permute(1, 2, 0).numpy()
        assert got.shape == expected.shape == (64, 64, 3), path.name
        difference = np.abs(got - expected)
        assert difference.max() <= 1.0, path.name
        if "72x72" in path.name:  # no resize at all: the very same pixels
            assert difference.max() == 0.0


def test_onnx_at_the_pack_size_and_another_size_matches_predict(runs, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    checkpoint = runs["channel"]
    wnids = [c.wnid for c in inference_from(checkpoint, torch.device("cpu")).classes]
    done = subprocess.run([sys.executable, "-m", "pipeline", "export", str(checkpoint),
                           "--format", "onnx", "--out", str(tmp_path / "model.onnx")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "N x 72 x 72 x 3" in done.stdout
    export(checkpoint, "onnx", tmp_path / "model96.onnx", size=96)
    for name, side in (("model.onnx", 72), ("model96.onnx", 96)):
        session = onnxruntime.InferenceSession(str(tmp_path / name),
                                               providers=["CPUExecutionProvider"])
        metadata = json.loads(session.get_modelmeta().custom_metadata_map[METADATA_KEY])
        assert [c["wnid"] for c in metadata["classes"]] == wnids
        assert (metadata["input"]["height"], metadata["input"]["width"]) == (side, side)
        paths = [write_image(tmp_path / f"{side}" / f"{i}.png", seed=i, fmt="PNG",
                             size=(side, side)) for i in range(5)]
        batch = torch.cat([served_input(p) for p in paths]).numpy()
        expected = predicted(checkpoint, paths, wnids)
        four = session.run(None, {"images": batch[:4]})[0]
        ones = np.concatenate([session.run(None, {"images": batch[i:i + 1]})[0]
                               for i in range(len(batch))])
        np.testing.assert_allclose(four, expected[:4], atol=PROBABILITY_TOLERANCE)
        np.testing.assert_allclose(ones, expected, atol=PROBABILITY_TOLERANCE)
        assert (ones.argmax(axis=1) == expected.argmax(axis=1)).all()


SERVER = """
import json, sys
import numpy as np
import torch
sys.modules["pipeline"] = None  # this Python cannot import the package that exported it
extra = {"pipeline.json": ""}
model = torch.export.load(sys.argv[1], extra_files=extra).module()
batch = torch.from_numpy(np.load(sys.argv[2]))
with torch.no_grad():
    together = model(batch[:4])
    alone = torch.cat([model(batch[i:i + 1]) for i in range(len(batch))])
print(json.dumps({"about": json.loads(extra["pipeline.json"]), "four": together.tolist(),
                  "alone": alone.tolist()}))
"""


def test_pt2_is_the_default_and_serves_with_plain_torch(runs, tmp_path):
    """A fine-tuned model exported as a torch.export program, loaded in a Python that cannot
    import pipeline: a batch of 4 and single images give predict's probabilities and top-1."""
    checkpoint = runs["channel"]
    wnids = [c.wnid for c in inference_from(checkpoint, torch.device("cpu")).classes]
    done = subprocess.run([sys.executable, "-m", "pipeline", "export", str(checkpoint),
                           "--out", str(tmp_path / "model.pt2")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "N x 72 x 72 x 3" in done.stdout
    paths = [write_image(tmp_path / "72" / f"{i}.png", seed=i, fmt="PNG", size=(72, 72))
             for i in range(6)]
    np.save(tmp_path / "batch.npy", torch.cat([served_input(p) for p in paths]).numpy())
    served = subprocess.run([sys.executable, "-c", SERVER, str(tmp_path / "model.pt2"),
                             str(tmp_path / "batch.npy")], capture_output=True, text=True,
                            timeout=300)
    assert served.returncode == 0, served.stderr[-2000:]
    result = json.loads(served.stdout)
    assert result["about"]["exported_as"] == "pt2"
    assert [c["wnid"] for c in result["about"]["classes"]] == wnids
    assert (result["about"]["input"]["height"], result["about"]["input"]["width"]) == (72, 72)
    expected = predicted(checkpoint, paths, wnids)
    np.testing.assert_allclose(result["four"], expected[:4], atol=PROBABILITY_TOLERANCE)
    np.testing.assert_allclose(result["alone"], expected, atol=PROBABILITY_TOLERANCE)
    assert (np.argmax(result["alone"], axis=1) == expected.argmax(axis=1)).all()


def test_missing_onnx_packages_is_one_line_and_exit_2(runs, tmp_path):
    hide = "import sys; sys.modules['onnxscript'] = None; from pipeline.cli import main; main()"
    done = subprocess.run([sys.executable, "-c", hide, "export", str(runs["channel"]),
                           "--format", "onnx", "--out", str(tmp_path / "m.onnx")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: --format onnx needs onnxscript: pip install "
                                   "'synset-pipeline[onnx]' (or export --format pt2)")
    assert not (tmp_path / "m.onnx").exists()


def test_bad_checkpoint_and_size_with_torchscript_are_one_line(runs, tmp_path):
    not_a_checkpoint = tmp_path / "x.pt"
    torch.save({"model": {}}, not_a_checkpoint)
    for args, message in (
            ([str(not_a_checkpoint), "--format", "torchscript"], "x.pt is not a `pipeline"),
            ([str(runs["channel"]), "--format", "torchscript", "--size", "96"],
             "a TorchScript model takes any size")):
        done = subprocess.run([sys.executable, "-m", "pipeline", "export", *args, "--out",
                               str(tmp_path / "out.pt")], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 2
        assert message in done.stderr
        assert done.stderr.strip().count("\n") == 0
    assert not (tmp_path / "out.pt").exists()

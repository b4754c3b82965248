"""The Makefile chain end to end on a miniature sample, and the demo's mirror clean-up."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.testing import make_sample
from pipeline.testing.serve_sample import serve_in_thread

pytestmark = pytest.mark.slow  # trains or runs the whole chain

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(sys.executable).parent.parent


def make(target: str, variables: dict[str, object], *flags: str) -> subprocess.CompletedProcess:
    command = ["make", "--no-print-directory", "-C", str(ROOT), *flags, target,
               f"VENV={VENV}", "SETUP=", *(f"{k}={v}" for k, v in variables.items())]
    return subprocess.run(command, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A finished `make all` (report and card) on 3 synsets of 24 images at 72 px, 1 epoch."""
    base = tmp_path_factory.mktemp("chain")
    sample = base / "sample"
    wnids = make_sample.make_sample(sample, classes=3, per_class=24)
    with serve_in_thread(sample, max_seconds=600) as mirror:
        make_sample.build_url_list(sample, mirror.base_url, base / "urls.txt",
                                   mix={"404": 0.1, "html": 0.05, "truncated": 0.05})
        variables = {
            "DATA": base / "data", "MANIFESTS": base / "manifests", "RUNS": base / "runs",
            "RUN": "mini", "WNIDS": " ".join(wnids), "URLS": base / "urls.txt",
            "WORDS": sample / "words.txt", "WEIGHTS": "none", "FREEZE": "conv2", "EPOCHS": 1,
            "SIZE": 72, "CROP": 64, "BATCH": 8, "VAL_RATIO": 0.25,
            "GATHER_ARGS": "--timeout 5 --retries 1", "FINETUNE_ARGS": "--workers 0",
        }
        done = make("all", variables)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        yield base, variables, done


def test_the_chain_produces_every_stage_output(chain):
    base, _, done = chain
    for relative in ("data/raw/gather.jsonl", "data/validate.jsonl", "manifests/train.txt",
                     "manifests/labels.txt", "data/mean.npy", "data/mean.png",
                     "data/train.h5", "data/val.h5", "runs/mini/best.pt",
                     "runs/mini/log.csv", "runs/mini/eval-val/confusion.csv",
                     "runs/mini/report.html", "manifests/croissant.json",
                     "manifests/images.csv"):
        assert (base / relative).exists(), relative
    assert '"outcome": "not_image"' in (base / "data" / "raw" / "gather.jsonl").read_text()
    assert "<img src='data:image/png;base64," in (base / "runs/mini/report.html").read_text()


def test_a_second_make_does_nothing(chain):
    _, variables, _ = chain
    assert make("all", variables, "-q").returncode == 0
    again = make("all", variables)
    assert again.returncode == 0 and "pipeline" not in again.stdout


def test_touching_a_stage_input_rebuilds_only_what_depends_on_it(chain):
    base, variables, _ = chain
    later = time.time() + 5
    os.utime(base / "manifests" / "train.txt", (later, later))
    plan = make("all", variables, "-n").stdout
    for stage in ("pipeline mean", "pipeline finetune", "pipeline evaluate", "pipeline report",
                  "pipeline card"):
        assert stage in plan, stage
    for stage in ("pipeline gather", "pipeline validate", "pipeline label"):
        assert stage not in plan, stage
    assert f"pack {base / 'manifests' / 'train.txt'}" in plan
    assert f"pack {base / 'manifests' / 'val.txt'}" not in plan


def test_demo_stops_its_mirror_when_a_stage_fails(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--out", str(tmp_path),
         "--per-class", "12", "--source-epochs", "0"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "PATH": f"{VENV / 'bin'}:{os.environ['PATH']}"})
    assert done.returncode != 0
    pid = int(done.stdout.split("(pid ")[1].split(")")[0])
    assert "mirror stopped" in done.stdout
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)

"""scripts/gpu_check.sh: it parses, it says clearly when there is no GPU, and its Python half
runs every step at toy size on the CPU (the batched-decoding code on CPU tensors)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.sh"
ENV = {**os.environ, "VENV": sys.prefix, "OMP_NUM_THREADS": "1"}


def test_the_script_parses_and_its_python_half_takes_the_options_it_documents():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    usage = next(line for line in SCRIPT.read_text().splitlines() if "bash scripts/" in line)
    documented = set(re.findall(r"--[a-z][a-z-]+", usage))
    done = subprocess.run([sys.executable, str(SCRIPT.with_suffix(".py")), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert documented == {"--workdir", "--cpu-dry-run"}
    assert documented <= set(re.findall(r"--[a-z][a-z-]+", done.stdout))


@pytest.mark.slow  # ~10 s: the script starts a Python that imports torch
def test_without_a_gpu_it_says_so_and_measures_nothing(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = subprocess.run(["bash", str(SCRIPT), "--workdir", str(tmp_path)], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "torch.cuda.is_available() is False" in done.stdout + done.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_the_cpu_dry_run_runs_every_step_and_prints_one_summary(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), "--cpu-dry-run", "--workdir", str(tmp_path)],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = [line for line in done.stdout.splitlines() if line.startswith("GPU CHECK OK")]
    assert len(summary) == 1
    assert "CPU decode vs" in summary[0] and "cpu batch decode" in summary[0]
    assert "alexnet bf16" in summary[0] and "vgg16 bf16" in summary[0]
    assert (tmp_path / "train-jpeg-72.h5").exists()

"""The distribution: `python -m build` makes a wheel that works outside this checkout.

The wheel goes into a fresh venv (no pip, no project, nothing from this tree) with --no-deps;
its dependencies (torch & co., gigabytes) are made importable by a .pth line pointing at this
interpreter's site-packages, which only adds that folder to sys.path: the editable install's
own .pth there is not processed, so `pipeline` can only come from the wheel.
"""

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pipeline", "setup.cfg", "pyproject.toml", "README.md")


def run(*command: str | Path, cwd: Path) -> str:
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True,
                          timeout=300, cwd=cwd)
    assert done.returncode == 0, f"{command}: {done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.slow
def test_the_wheel_installs_into_a_fresh_venv_and_runs(tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir",
        tmp_path / "dist", source, cwd=tmp_path)
    wheel, = (tmp_path / "dist").glob("*.whl")
    assert wheel.name.startswith("synset_pipeline-")

    fresh = tmp_path / "fresh"
    run(sys.executable, "-m", "venv", "--without-pip", fresh, cwd=tmp_path)
    python = fresh / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps",
        "--no-index", wheel, cwd=tmp_path)
    fresh_site = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                     cwd=tmp_path).strip()
    (Path(fresh_site) / "project_dependencies.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n")

    where = run(python, "-c", "import importlib.metadata as m, pipeline; "
                "print(m.version('synset-pipeline'), pipeline.__file__)", cwd=tmp_path)
    version, location = where.split()
    assert version == run(sys.executable, "-c", "import pipeline; print(pipeline.__version__)",
                          cwd=ROOT).strip()
    assert Path(location).is_relative_to(fresh)
    command = fresh / "bin" / "pipeline"
    assert "export" in run(command, "--help", cwd=tmp_path)
    layers = run(command, "layers", "--arch", "alexnet", "--freeze-until", "conv4", cwd=tmp_path)
    assert "conv4" in layers and "fc8" in layers

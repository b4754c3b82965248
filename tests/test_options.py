"""The Makefile's `?=` defaults are the Python defaults: a default is written once in Python
(options dataclasses, pipeline/core/stage_options.py) and the Makefile must agree with it."""

import re
from pathlib import Path

from pipeline.core.stage_options import LABEL, SIZE
from pipeline.formats import runfolder
from pipeline.stages.finetune.options import FinetuneConfig

MAKEFILE = Path(__file__).resolve().parent.parent / "Makefile"
FINETUNE = FinetuneConfig(train=Path("."))

# Makefile variable -> its Python default.
PYTHON_DEFAULTS = {
    "ARCH": FINETUNE.arch,
    "WEIGHTS": FINETUNE.weights,
    "FREEZE": FINETUNE.freeze_until,
    "EPOCHS": FINETUNE.epochs,
    "BATCH": FINETUNE.batch_size,
    "LR": FINETUNE.lr,
    "CROP": FINETUNE.crop,
    "SIZE": SIZE,
    "MEAN": FINETUNE.mean,
    "VAL_RATIO": LABEL.val_ratio,
}


def makefile_defaults() -> dict[str, str]:
    pattern = re.compile(r"^([A-Z_]+)\s*\?=\s*([^#]*)#", re.MULTILINE)
    return {name: value.strip() for name, value in pattern.findall(MAKEFILE.read_text())}


def test_makefile_defaults_equal_the_python_defaults():
    make = makefile_defaults()
    for name, default in PYTHON_DEFAULTS.items():
        assert name in make, f"Makefile has no {name} ?= default"
        value = type(default)(make[name]) if not isinstance(default, str) else make[name]
        assert value == default, f"Makefile {name} ?= {make[name]}, Python default {default!r}"


def test_finetune_resizes_to_the_packed_size():
    assert FINETUNE.resize == SIZE


def test_makefile_uses_the_run_folder_layout():
    """The Makefile cannot import pipeline/formats/runfolder.py, so it must spell the same names."""
    text = MAKEFILE.read_text()
    run = Path("$(RUNDIR)")
    for path in (run / runfolder.CHECKPOINT, run / runfolder.BEST, run / runfolder.METRICS,
                 runfolder.eval_folder(run, "$(DATA)/val.h5") / runfolder.EVAL_JSON):
        assert str(path) in text, f"the Makefile never names {path}"

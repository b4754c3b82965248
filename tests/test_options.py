"""The Makefile's `?=` defaults are the Python defaults: a default is written once in Python
(options dataclasses, pipeline/core/stage_options.py) and the Makefile must agree with it."""

import dataclasses
import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.core.options import cli_fields
from pipeline.core.stage_options import (
    LABEL,
    SIZE,
    EvaluateOptions,
    ExportOptions,
    LabelOptions,
    MeanOptions,
    PackOptions,
    PredictOptions,
    ValidateOptions,
)
from pipeline.formats import runfolder
from pipeline.stages import gather as gather_stage
from pipeline.stages.finetune.options import FinetuneConfig
from pipeline.stages.gather.options import GatherOptions

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


# -- each option written once: the command line is generated from the options dataclasses

COMMANDS = {"gather": GatherOptions, "validate": ValidateOptions, "label": LabelOptions,
            "finetune": FinetuneConfig, "evaluate": EvaluateOptions, "predict": PredictOptions,
            "pack": PackOptions, "export": ExportOptions, "mean": MeanOptions}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_field_is_a_command_line_option_with_its_default(command):
    params = {param.name: param for param in cli.commands[command].params}
    for field in cli_fields(COMMANDS[command]):
        assert field.name in params, f"pipeline {command} has no option for {field.name}"
        default = params[field.name].default
        if field.default is dataclasses.MISSING:
            assert params[field.name].required
        elif not field.metadata["cli"].parse:  # parsed fields hold the parsed form
            assert default == field.default or (default is None and field.default == ()), (
                f"pipeline {command} --{field.name}: {default!r} != {field.default!r}")


def test_the_command_line_builds_the_options_object_the_python_api_takes(monkeypatch, tmp_path):
    placeholder = tmp_path / "placeholder.jpg"
    placeholder.write_bytes(b"not really a picture")
    calls = []
    monkeypatch.setattr(gather_stage, "gather_synsets",
                        lambda *args, **kwargs: calls.append((args, kwargs)) or _Report())
    result = CliRunner().invoke(cli, [
        "gather", "--urls", "list.txt", "--wnid", "n01", "--timeout", "5", "--ignore-opt-out",
        "--resolve", "img.example:80:127.0.0.2", "--dns-server", "127.0.0.1:5353",
        "--placeholder", str(placeholder), "--processes", "2"])
    assert result.exit_code == 0, result.output
    (urls, wnids, options), kwargs = calls[0]
    assert (urls, wnids, kwargs) == (Path("list.txt"), ["n01"],
                                     {"is_a": None, "with_hyponyms": False})
    assert options == GatherOptions(
        timeout=5.0, honour_opt_out=False, resolve=(("img.example", 80, "127.0.0.2"),),
        dns_servers=("127.0.0.1:5353",), processes=2,
        placeholder_digests=frozenset({hashlib.sha256(b"not really a picture").hexdigest()}))


class _Report:
    interrupted_by = 0

    def summary(self, words: object) -> str:
        return "done"


def test_the_package_exports_the_stage_functions_without_importing_torch():
    code = ("import sys, pipeline\n"
            "heavy = [m for m in ('torch', 'numpy', 'PIL', 'aiohttp', 'h5py')\n"
            "         if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "from pipeline.stages.gather import gather_synsets\n"
            "assert pipeline.gather_synsets is gather_synsets\n"
            "assert all(getattr(pipeline, name) is not None for name in pipeline.__all__)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]

"""The one torch.load: every unreadable file the user names is one line saying why."""

import collections

import pytest
import torch
from torch import nn

from pipeline.core.errors import InputError
from pipeline.formats import checkpoint
from pipeline.formats.manifest import ClassRecord
from pipeline.ml.normalization import Normalization
from pipeline.ml.preprocess import InputSpec
from pipeline.stages.finetune import saver as saver_module
from pipeline.stages.finetune.saver import RunIdentity, RunSaver, TrainingState


class NotAWeight:
    """Any class: a weights-only load refuses to rebuild it."""


def test_a_pickled_object_is_refused_in_one_line_with_the_fix(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"state": collections.OrderedDict(), "model": NotAWeight()}, path)
    with pytest.raises(InputError) as caught:
        checkpoint.read_torch_file(path, "--weights")
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and "state_dict" in message


def test_a_corrupt_or_missing_file_is_one_line(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(InputError) as caught:
        checkpoint.read_torch_file(corrupt, "checkpoint")
    assert "\n" not in str(caught.value) and "not a readable PyTorch file" in str(caught.value)
    with pytest.raises(InputError, match="does not exist"):
        checkpoint.read_torch_file(tmp_path / "missing.pt", "checkpoint")


def test_a_tensor_file_that_is_not_a_checkpoint_says_so(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(InputError, match="not a `pipeline finetune` checkpoint"):
        checkpoint.load(path)


def test_checkpoints_are_written_when_due_and_for_the_best_and_the_last_epoch(tmp_path,
                                                                           monkeypatch):
    """--checkpoint-every: a checkpoint every so many seconds, plus the best and the last
    epoch (a tiny real model; the clock is the saver's own)."""
    clock = [1000.0]
    monkeypatch.setattr(saver_module.time, "monotonic", lambda: clock[0])
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = TrainingState(model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 1),
                          torch.amp.GradScaler("cuda", enabled=False), Normalization.imagenet())
    identity = RunIdentity("alexnet", [ClassRecord(0, "n0", "a"), ClassRecord(1, "n1", "b")],
                           InputSpec(crop=64, resize=72), {})
    saver = RunSaver(tmp_path / "run", identity, every=300)
    saver.start()
    saved = []
    for epoch, improved, seconds in ((1, True, 10), (2, False, 100), (3, False, 100),
                                     (4, False, 150), (5, False, 10)):
        clock[0] += seconds
        state.epoch = epoch
        saver.record_epoch({"epoch": epoch}, state, improved=improved, last=epoch == 5)
        saved.append(checkpoint.load(saver.checkpoint)["epoch"])
    # epoch 4 comes 350 s after the save of epoch 1; epoch 5 is the last
    assert saved == [1, 1, 1, 4, 5]
    assert checkpoint.load(saver.best)["epoch"] == 1
    assert len((tmp_path / "run" / "log.csv").read_text().splitlines()) == 6  # every epoch

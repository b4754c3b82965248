"""The one torch.load: every unreadable file the user names is one line saying why."""

import collections

import pytest
import torch

from pipeline.core.errors import InputError
from pipeline.formats import checkpoint


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

import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import make_sample  # noqa: E402


@pytest.fixture(scope="session")
def sample(tmp_path_factory) -> Path:
    """A small copy of the offline ImageNet: 3 synsets x 60 images, words and is-a files."""
    out = tmp_path_factory.mktemp("sample")
    make_sample.make_sample(out, classes=3, per_class=60, seed=0)
    return out

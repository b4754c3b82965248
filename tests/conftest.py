from pathlib import Path

import pytest

from pipeline.testing import make_sample  # noqa: E402


@pytest.fixture(scope="session")
def sample(tmp_path_factory) -> Path:
    """A small copy of the offline ImageNet: 3 synsets x 60 images, words and is-a files."""
    out = tmp_path_factory.mktemp("sample")
    make_sample.make_sample(out, classes=3, per_class=60, seed=0)
    return out


@pytest.fixture(scope="session")
def picture_names(tmp_path_factory) -> Path:
    """A sample's layout with 11,000 empty picture files (every 12th a PNG): names enough for
    a 20,000-URL real world (serve_web.build_real_world) in a second, for tests that build or
    start one but never fetch its pictures."""
    out = tmp_path_factory.mktemp("picture_names")
    for index in range(10):
        wnid = make_sample.wnid_for(index)
        folder = out / "files" / wnid
        folder.mkdir(parents=True)
        for num in range(1, 1101):
            (folder / f"{wnid}_{num}.{'png' if num % 12 == 0 else 'jpg'}").touch()
    make_sample.placeholder_image().save(out / "placeholder.png")
    return out

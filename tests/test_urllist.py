import os
from pathlib import Path

import pytest

from pipeline.errors import InputError
from pipeline.urllist import (
    check_wnid,
    expand_hyponyms,
    read_is_a,
    read_words,
    safe_file_stem,
    select_urls,
)

import make_sample


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_select_keeps_only_requested_synsets_and_reports_malformed_lines(tmp_path):
    urls = write(tmp_path / "urls.txt", "\n".join([
        "n00000001_1\thttp://a/1.jpg",
        "n00000002_1\thttp://a/2.jpg",
        "garbage line without tab",
        "n00000001_2\thttp://a/3.jpg",
        "nounderscore\thttp://a/4.jpg",
        "n00000001_3\tftp://not-http/5.jpg",
        "",
        "n00000001_4\thttps://a/é.jpg",
    ]) + "\n")
    selection = select_urls(urls, {"n00000001": "n00000001"})
    assert [e.id for e in selection.entries] == ["n00000001_1", "n00000001_2", "n00000001_4"]
    assert selection.entries[2].url == "https://a/é.jpg"
    assert selection.lines == 8
    assert selection.malformed == 3
    assert [n for n, _ in selection.malformed_examples] == [3, 5, 6]


def test_unknown_wnid_is_an_error_naming_it(tmp_path):
    urls = write(tmp_path / "urls.txt", "n00000001_1\thttp://a/1.jpg\n")
    with pytest.raises(InputError, match="n00000009"):
        select_urls(urls, {"n00000001": "n00000001", "n00000009": "n00000009"})


def test_missing_list_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        select_urls(tmp_path / "nope.txt", {"n00000001": "n00000001"})


def test_hyponyms_are_filed_under_the_requested_class(tmp_path):
    is_a = read_is_a(write(tmp_path / "is_a.txt", "p1 c1\np1 c2\nc2 g1\nother c3\n"))
    assert expand_hyponyms(["p1"], is_a) == {"p1": "p1", "c1": "p1", "c2": "p1", "g1": "p1"}
    urls = write(tmp_path / "urls.txt", "c1_1\thttp://x/1\ng1_7\thttp://x/2\nc3_1\thttp://x/3\n")
    selection = select_urls(urls, expand_hyponyms(["p1"], is_a))
    assert [(e.id, e.wnid, e.klass) for e in selection.entries] == [
        ("c1_1", "c1", "p1"), ("g1_7", "g1", "p1")]


@pytest.mark.parametrize("image_id", ["n1_../../etc/passwd", "../n1_1", "n1_a/b", "n1_\x00x",
                                      ".hidden_1", "n1_" + "x" * 500])
def test_file_stems_never_leave_their_directory(tmp_path, image_id):
    stem = safe_file_stem(image_id)
    assert "/" not in stem and "\x00" not in stem and not stem.startswith(".")
    assert len(stem) <= 200
    assert (tmp_path / f"{stem}.jpg").resolve().parent == tmp_path.resolve()


def test_wnid_must_be_a_plain_name():
    assert check_wnid("n02123045") == "n02123045"
    for bad in ["../n1", "n1/x", "", ".n1"]:
        with pytest.raises(InputError):
            check_wnid(bad)


def test_words_file_malformed_line_names_file_and_line(tmp_path):
    words = write(tmp_path / "words.txt", "n1\tcat, tabby\nn2 no tab here\n")
    with pytest.raises(InputError, match=r"words.txt:2"):
        read_words(words)
    assert read_words(write(tmp_path / "ok.txt", "n1\tcat, tabby\n")) == {"n1": "cat, tabby"}


def test_an_unchanged_url_list_keeps_its_mtime_so_make_redoes_nothing(sample, tmp_path):
    urls = tmp_path / "urls.txt"
    make_sample.build_url_list(sample, "http://127.0.0.1:8765", urls)
    os.utime(urls, (1_000_000_000, 1_000_000_000))
    make_sample.build_url_list(sample, "http://127.0.0.1:8765", urls)
    assert urls.stat().st_mtime == 1_000_000_000
    make_sample.build_url_list(sample, "http://127.0.0.1:9999", urls)
    assert urls.stat().st_mtime != 1_000_000_000 and ":9999/" in urls.read_text()

import os
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.errors import InputError
from pipeline.formats.urllist import (
    MalformedLine,
    UrlEntry,
    UrlLine,
    _repeated_ids,
    check_wnid,
    encode_url,
    parse_url_line,
    read_is_a,
    read_words,
    resolve_hyponyms,
    safe_file_stem,
    select_urls,
)
from pipeline.testing import make_sample

QUIRKS = Path(__file__).parent / "data" / "urls_quirks.txt"

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
    assert selection.entries[2].url == "https://a/%C3%A9.jpg"
    assert selection.lines == 8
    assert selection.malformed == 3
    assert [n for n, _ in selection.malformed_examples] == [3, 5, 6]


def test_quirks_of_the_real_list_give_exact_urls_counts_and_line_numbers():
    selection = select_urls(QUIRKS, {"n00000001": "n00000001"})
    assert [(e.id, e.url) for e in selection.entries] == [
        ("n00000001_1", "http://farm1.static.flickr.com/1/1_cafe.jpg"),  # after the BOM, CRLF
        ("n00000001_2", "http://www.example.com/caf%E9.jpg"),  # a raw Latin-1 byte
        ("n00000001_3", "http://www.example.com/ca%C3%B1on/%C3%A9t%C3%A9.jpg"),  # UTF-8 path
        ("n00000001_4", "http://xn--bcher-kva.example/bild.jpg?gr%C3%B6%C3%9Fe=1"),  # IDN host
        ("n00000001_5", "http://www.example.com/5.jpg"),  # the third field left out
        ("n00000001_6", "http://www.example.com/my%20photo%206.jpg"),  # trailing space stripped
        ("n00000001_7", "http://www.example.com/already%20encoded%2Fx.jpg"),
        ("n00000001_8", "http://www.example.com/100%25.jpg?a=50%25&b=%25zz"),
        ("n00000001_9", "https://www.example.com/9.jpg"),  # the fragment dropped
        ("n00000001_14", "http://www.example.com/a%22b%3Cc%3E%7Bd%7D%7Ce%5Ef%60g%5Ch.jpg"),
        ("n00000001_15", "http://WWW.Example.COM/Upper.JPG"),  # no final newline
    ]
    assert all(e.wnid == e.klass == "n00000001" for e in selection.entries)
    assert selection.lines == 20
    # ftp://, a Latin-1 host name, a line without a tab, a non-ASCII id
    assert selection.malformed == 4
    assert [n for n, _ in selection.malformed_examples] == [14, 15, 17, 18]
    assert selection.malformed_examples[2] == (17, "garbage without a tab")
    # line 8 has a third field too, but its synset was not asked for
    assert selection.extra_fields == 2
    assert selection.extra_fields_examples == [
        (6, "n00000001_5\thttp://www.example.com/5.jpg\tflickr"),
        (16, "n00000001_1\thttp://www.example.com/dup-again.jpg\textra")]
    assert selection.duplicate_ids == 2
    assert selection.duplicate_examples == [(12, "n00000001_2"), (16, "n00000001_1")]


def test_extra_fields_are_counted_in_every_selected_synset():
    selection = select_urls(QUIRKS, {"n00000001": "n00000001", "n00000002": "n00000002"})
    assert [n for n, _ in selection.extra_fields_examples] == [6, 8, 16]
    assert selection.entries[6] == UrlEntry(
        "n00000002_1", "n00000002", "http://other.example/unselected.jpg", "n00000002")


def test_examples_are_capped_but_every_problem_is_counted(tmp_path):
    path = tmp_path / "urls.txt"
    path.write_bytes(b"".join(b"n1_1\thttp://a/%d.jpg\tx\n" % n for n in range(9)))
    selection = select_urls(path, {"n1": "n1"})
    assert len(selection.entries) == 1
    assert (selection.extra_fields, selection.duplicate_ids) == (9, 8)
    assert [n for n, _ in selection.extra_fields_examples] == [1, 2, 3, 4, 5]
    assert [n for n, _ in selection.duplicate_examples] == [2, 3, 4, 5, 6]


@pytest.mark.parametrize(("raw", "url"), [
    (b"http://a/b.jpg", "http://a/b.jpg"),
    (b"HTTPS://a/b.jpg", "https://a/b.jpg"),
    (b"http://a/caf\xe9.jpg", "http://a/caf%E9.jpg"),
    ("http://a/é?q=é".encode(), "http://a/%C3%A9?q=%C3%A9"),
    ("http://Bücher.example:8080/x".encode(), "http://xn--bcher-kva.example:8080/x"),
    (b"http://a/x%2fy%41", "http://a/x%2fy%41"),
    (b"http://a/%", "http://a/%25"),
    (b"http://a/%4", "http://a/%254"),
    (b"http://a/\x01\x7f x", "http://a/%01%7F%20x"),
    (b"http://a/p?q=1#frag ment", "http://a/p?q=1"),
    (b"http://a", "http://a"),
    (b"http://user:p w@host/x", "http://user:p%20w@host/x"),
    (b"http://[::1]:8765/x", "http://[::1]:8765/x"),
    (b"http://127.0.0.1:8765/n1/1.jpg", "http://127.0.0.1:8765/n1/1.jpg"),
])
def test_encode_url_sends_the_lists_bytes_as_a_valid_url(raw, url):
    assert encode_url(raw) == url


@pytest.mark.parametrize("raw", [
    b"ftp://a/b.jpg", b"a/b.jpg", b"http:/a/b.jpg", b"http://", b"http:///b.jpg",
    b"http://caf\xe9.example/", "http://☃.example/".encode(), b"http://a b/",
    b"http://a\\b/", b"http://a:x/", b"http://a:65536/", b"http://[zz]/",
])
def test_encode_url_rejects_what_cannot_be_fetched(raw):
    with pytest.raises(MalformedLine):
        encode_url(raw)


@pytest.mark.parametrize(("line", "parsed"), [
    (b"n1_1\thttp://a/1.jpg\n", UrlLine("n1_1", "http://a/1.jpg", False)),
    (b" n1_1 \t http://a/1.jpg \r\n", UrlLine("n1_1", "http://a/1.jpg", False)),
    (b"n1_1\thttp://a/1.jpg\tflickr\tmore", UrlLine("n1_1", "http://a/1.jpg", True)),
    (b"n1_1\thttp://a/1.jpg\t\n", UrlLine("n1_1", "http://a/1.jpg", True)),
])
def test_parse_url_line_keeps_the_first_two_fields(line, parsed):
    assert parse_url_line(line) == parsed


@pytest.mark.parametrize("line", [
    b"n1_1 http://a/1.jpg\n", b"n1\thttp://a/1.jpg\n", b"n1_\xe9\thttp://a/1.jpg\n",
    b"n1_1\tftp://a/1.jpg\n", b"n1_1\t\thttp://a/1.jpg\n",
])
def test_parse_url_line_rejects_a_bad_id_or_url(line):
    with pytest.raises(MalformedLine):
        parse_url_line(line)


def test_unknown_wnid_is_an_error_naming_it(tmp_path):
    urls = write(tmp_path / "urls.txt", "n00000001_1\thttp://a/1.jpg\n")
    with pytest.raises(InputError, match="n00000009"):
        select_urls(urls, {"n00000001": "n00000001", "n00000009": "n00000009"})


def test_missing_list_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        select_urls(tmp_path / "nope.txt", {"n00000001": "n00000001"})


def test_hyponyms_are_filed_under_the_requested_class(tmp_path):
    is_a = read_is_a(write(tmp_path / "is_a.txt", "p1 c1\np1 c2\nc2 g1\nother c3\n"))
    hyponyms = resolve_hyponyms(["p1"], is_a)
    assert hyponyms.classes == {"p1": "p1", "c1": "p1", "c2": "p1", "g1": "p1"}
    assert hyponyms.conflicts == {}
    urls = write(tmp_path / "urls.txt", "c1_1\thttp://x/1\ng1_7\thttp://x/2\nc3_1\thttp://x/3\n")
    selection = select_urls(urls, hyponyms.classes)
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


def test_the_selection_waits_on_disk_with_8_bytes_per_url_in_memory(tmp_path):
    lines = [f"n00000001_{k}\thttp://h{k % 3}.example/{k}.jpg" for k in range(1000)]
    urls = write(tmp_path / "urls.txt", "\n".join(lines + ["n00000001_5\thttp://x/again.jpg",
                                                           "n00000002_1\thttp://a/b.jpg"]) + "\n")
    with select_urls(urls, {"n00000001": "n00000001", "n00000002": "n00000001"},
                     tmp_path) as selection:
        assert len(selection) == 1001 and selection.offsets.nbytes == 8 * 1002
        assert selection.duplicate_examples == [(1001, "n00000001_5")]
        assert selection.entry(5).url == "http://h2.example/5.jpg"  # the first line won
        assert selection.entry(1000) == UrlEntry("n00000002_1", "n00000002", "http://a/b.jpg",
                                                 "n00000001")
        assert [e.id for e in selection][:2] == ["n00000001_0", "n00000001_1"]
        selection.keep_only(lambda index, entry: index % 2 == 0 and entry.wnid == "n00000001")
        assert len(selection) == 500 and selection.entry(1).id == "n00000001_2"
        assert selection.classes == {"n00000001"}
        assert not list(tmp_path.glob("tmp*"))  # the spool has no name: a kill leaves nothing
    assert selection.spool.closed


def test_equal_hashes_are_only_candidates_for_a_repeated_id():
    ids = ["a", "b", "a", "c", "b", "a"]
    entry = [UrlEntry(i, "n", "http://x/", "n") for i in ids].__getitem__
    colliding = np.zeros(len(ids), np.int64)  # every hash the same: ids decide
    assert _repeated_ids(colliding, entry).tolist() == [2, 4, 5]
    assert _repeated_ids(np.arange(len(ids), dtype=np.int64), entry).tolist() == []

"""Hyponyms filed by the WordNet graph, not by argument order, on an excerpt of the real
ImageNet is-a graph and words (tests/data/README.md), and through gather against a mirror."""

from collections import Counter
from pathlib import Path

import pytest
from test_gather import kept_files, options

from pipeline.core.errors import InputError
from pipeline.formats.journal import read_journal
from pipeline.formats.urllist import read_hyponym_conflicts, read_is_a, read_words, resolve_hyponyms
from pipeline.stages.gather import gather_synsets
from pipeline.testing.serve_sample import serve_in_thread

DATA = Path(__file__).parent / "data"
IS_A = DATA / "wordnet_excerpt.is_a.txt"
DOMESTIC_CAT, TABBY = "n02121808", "n02123045"
TIGER, LION, CUB = "n02129604", "n02129165", "n01322685"
TIGER_CUB, LION_CUB = "n01323068", "n01322898"


@pytest.mark.parametrize("order", [[DOMESTIC_CAT, TABBY], [TABBY, DOMESTIC_CAT]])
def test_a_class_and_its_descendant_get_the_same_synsets_in_either_order(order):
    hyponyms = resolve_hyponyms(order, read_is_a(IS_A))
    assert hyponyms.conflicts == {}
    assert Counter(hyponyms.classes.values()) == {DOMESTIC_CAT: 18, TABBY: 1}
    assert hyponyms.classes[TABBY] == TABBY
    names = read_words(DATA / "words_excerpt.txt")
    assert names[TABBY].startswith("tabby") and names[DOMESTIC_CAT].startswith("domestic cat")


@pytest.mark.parametrize("order", [[TIGER, CUB], [CUB, TIGER]])
def test_a_synset_under_two_unrelated_classes_is_a_conflict(order):
    hyponyms = resolve_hyponyms(order, read_is_a(IS_A))
    assert hyponyms.conflicts == {TIGER_CUB: order}  # both tiger and cub: two labels
    assert hyponyms.classes[LION_CUB] == CUB  # lion was not asked for: only a cub
    assert TIGER_CUB not in hyponyms.classes


def test_the_more_specific_class_settles_a_multi_parent_synset():
    hyponyms = resolve_hyponyms([CUB, TIGER, TIGER_CUB], read_is_a(IS_A))
    assert hyponyms.conflicts == {} and hyponyms.classes[TIGER_CUB] == TIGER_CUB


@pytest.fixture(scope="module")
def mirror(sample):
    with serve_in_thread(sample, max_seconds=300) as handle:
        yield handle


def url_lines(mirror, sample: Path, wnids: list[str], per_synset: int = 3) -> str:
    """Real images of the sample, served under the excerpt's synset ids."""
    images = sorted((sample / "files").rglob("*.jpg"))
    lines, k = [], 0
    for wnid in wnids:
        for n in range(per_synset):
            image = images[k % len(images)]
            lines.append(f"{wnid}_{n}\t{mirror.base_url}/uniq/{k}/{image.parent.name}/"
                         f"{image.name}")
            k += 1
    return "\n".join(lines) + "\n"


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["drop", "first"])
def test_gather_reports_and_resolves_hyponym_conflicts(sample, mirror, tmp_path, policy):
    wnids = [TIGER, CUB, TIGER_CUB, LION_CUB]
    (tmp_path / "urls.txt").write_text(url_lines(mirror, sample, wnids))
    out = tmp_path / "raw"
    report = gather_synsets(tmp_path / "urls.txt", [CUB, TIGER],
                            options(out, sample, hyponym_conflicts=policy), is_a=IS_A,
                            with_hyponyms=True)
    journal = read_journal(out / "gather.jsonl")
    filed = Counter((r["class"], r["wnid"]) for r in journal.values() if r["outcome"] == "ok")
    expected = {(TIGER, TIGER): 3, (CUB, CUB): 3, (CUB, LION_CUB): 3}
    if policy == "first":
        expected[CUB, TIGER_CUB] = 3
    assert filed == expected
    assert len([p for p in kept_files(out) if p.endswith(".jpg")]) == sum(expected.values())
    assert report.hyponym_conflicts == [
        (TIGER_CUB, [CUB, TIGER], 3, "dropped" if policy == "drop" else CUB)]
    assert read_hyponym_conflicts(out / "hyponym_conflicts.txt") == [
        {"synset": TIGER_CUB, "classes": f"{CUB},{TIGER}", "urls": "3",
         "resolution": "dropped" if policy == "drop" else CUB}]
    summary = report.summary(read_words(DATA / "words_excerpt.txt"))
    assert "lion cub" in summary
    assert "1 hyponym(s) under two requested classes (3 URL(s))" in summary


@pytest.mark.parametrize("policy", ["drop", "first"])
def test_a_class_left_only_with_shared_hyponyms_is_an_error_not_a_silent_gap(sample, tmp_path,
                                                                              policy):
    """Cub's only URLs are of tiger cubs, which tiger claims too: dropped (or filed under
    tiger, the first asked for), cub would vanish from the dataset without a word."""
    (tmp_path / "urls.txt").write_text("".join(
        f"{wnid}_{n}\thttp://127.0.0.1:9/{wnid}/{n}.jpg\n"
        for wnid in (TIGER, TIGER_CUB) for n in range(3)))
    with pytest.raises(InputError) as raised:
        gather_synsets(tmp_path / "urls.txt", [TIGER, CUB],
                       options(tmp_path / "raw", sample, hyponym_conflicts=policy), is_a=IS_A,
                       with_hyponyms=True)
    message = str(raised.value)
    assert message.startswith(f"class {CUB} has no URL of its own")
    assert (f"{TIGER_CUB} (dropped)" if policy == "drop"
            else f"{TIGER_CUB} (filed under {TIGER})") in message
    assert "\n" not in message
    assert read_hyponym_conflicts(tmp_path / "raw" / "hyponym_conflicts.txt")[0]["urls"] == "3"

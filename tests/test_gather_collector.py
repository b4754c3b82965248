"""The collector's compact bookkeeping: kept images as digest prefixes pointing into the
journal (DigestRows) and by perceptual hash (NearRows), files on disk as stem hashes
(StemIndex), the journal indexed in batches; duplicates, placeholder take-back (identical and
near-identical bodies) and recovery of unjournaled files read back from the journal."""

import hashlib
import io
import json
import os
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from pipeline.core.errors import InputError
from pipeline.core.fsutil import JsonLinesWriter
from pipeline.formats import journal as journal_module
from pipeline.formats.journal import JournalIndex, read_journal, read_placeholders, read_records
from pipeline.formats.urllist import UrlEntry
from pipeline.stages.gather import digests
from pipeline.stages.gather.digests import DigestRows, NearRows, digest_key
from pipeline.stages.gather.options import GatherOptions
from pipeline.stages.gather.placeholders import FINGERPRINT_DIGITS, Fingerprint
from pipeline.stages.gather.store import (
    Collector,
    Staged,
    StemIndex,
    stage_body,
    target_stem,
)
from pipeline.testing import serve_web

from imagefiles import pattern, write_image


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_digest_rows_find_every_offset_of_a_digest_across_merges(monkeypatch):
    monkeypatch.setattr(digests, "MERGE_AT", 4)
    rows = DigestRows()
    for offset in range(10):
        rows.add(sha(f"image {offset % 3}"), offset)
    assert len(rows) == 10 and len(rows.keys) == 8  # two merges, two rows still recent
    assert rows.offsets_of(sha("image 0")) == [0, 3, 6, 9]
    assert rows.offsets_of(sha("image 1")) == [1, 4, 7]
    assert rows.offsets_of(sha("never seen")) == []
    rows.remove(sha("image 0"), 3)  # in the arrays: a tombstone until the next merge
    rows.remove(sha("image 0"), 9)  # recent
    rows.remove(sha("image 0"), 99)  # not held: nothing happens
    assert rows.offsets_of(sha("image 0")) == [0, 6]
    for offset in range(10, 14):
        rows.add(sha("image 0"), offset)
    assert rows.offsets_of(sha("image 0")) == [0, 6, 10, 11, 12, 13]
    assert np.all(np.diff(rows.keys) >= 0) and -1 not in rows.offsets.tolist()


def test_digest_rows_share_a_prefix_without_mixing_offsets_up():
    rows = DigestRows()
    first, second = "a" * 15 + "0" * 49, "a" * 15 + "f" * 49  # same 60-bit key
    assert digest_key(first) == digest_key(second)
    rows.add(first, 1)
    rows.add(second, 2)
    assert rows.offsets_of(first) == [1, 2]  # both candidates: the caller compares digests


def test_near_rows_find_exactly_the_hashes_within_the_distance_across_merges(monkeypatch):
    monkeypatch.setattr(digests, "MERGE_AT", 64)
    rng = np.random.default_rng(3)
    hashes = rng.integers(0, 2**63, 500, dtype=np.int64).astype(np.uint64) * np.uint64(2) + (
        rng.integers(0, 2, 500).astype(np.uint64))  # all 64 bits drawn
    rows = NearRows(7)
    for offset, value in enumerate(hashes.tolist()):
        rows.add(value, offset)
    assert len(rows) == 500 and len(rows.index) == 448  # 7 merges, 52 rows still recent
    for trial in range(200):
        probe = int(hashes[trial % 500])
        for bit in rng.choice(64, size=trial % 10, replace=False):
            probe ^= 1 << int(bit)  # 0..9 bits away from a held hash
        expected = np.flatnonzero(np.bitwise_count(hashes ^ np.uint64(probe)) <= 7).tolist()
        assert rows.offsets_near(probe) == expected
    rows.remove(int(hashes[3]), 3)  # merged: a tombstone
    rows.remove(int(hashes[499]), 499)  # recent
    rows.remove(int(hashes[5]), 6)  # not that hash's row: nothing happens
    assert 3 not in rows.offsets_near(int(hashes[3]))
    assert 499 not in rows.offsets_near(int(hashes[499]))
    assert 6 in rows.offsets_near(int(hashes[6]))


@pytest.mark.slow  # ~10 s: tracemalloc traces a million adds
def test_a_million_kept_images_take_about_16_bytes_each():
    rows = DigestRows()
    tracemalloc.start()
    try:
        for offset in range(1_000_000):
            rows.add(f"{offset * 2654435761 % 2**60:015x}", offset * 300)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rows.keys.nbytes + rows.offsets.nbytes <= 16 * 1_000_000
    assert peak < 40 * 2**20, f"{peak / 2**20:.0f} MiB"  # measured 29; as objects: hundreds


def test_near_rows_hold_about_32_bytes_a_row_and_a_megabyte_of_tables():
    rows = NearRows(7)
    hashes = np.random.default_rng(5).integers(0, 2**63, 200_000, dtype=np.int64).tolist()
    tracemalloc.start()
    try:
        for offset, value in enumerate(hashes):
            rows.add(value, offset * 300)
        current, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # 8 (hash) + 8 (offset) + 4 x 4 (block orders), 1 MiB of block tables, the recent buffer
    assert current < 32 * 200_000 + 1.5 * 2**20, f"{current / 200_000:.1f} bytes a row"


def test_the_journal_is_indexed_in_batches_and_the_last_line_still_wins(tmp_path,
                                                                        monkeypatch):
    monkeypatch.setattr(journal_module, "READ_BATCH", 3)
    path = tmp_path / "gather.jsonl"
    outcomes = [("a", "timeout"), ("b", "ok"), ("c", "unreachable"), ("a", "dead"),
                ("d", "ok"), ("b", "placeholder"), ("e", "timeout"), ("c", "ok")]
    with JsonLinesWriter(path) as journal:
        offsets = [journal.write({"id": i, "outcome": o}) for i, o in outcomes]
    index = JournalIndex.read(path)
    assert len(index) == 5
    assert [index.outcome(i) for i in "abcde"] == ["dead", "placeholder", "ok", "ok", "timeout"]
    assert np.all(index.keys[1:] > index.keys[:-1])  # sorted (np.diff would overflow int64)
    assert [r["id"] for _, r in read_records(path, offsets)] == [i for i, _ in outcomes]
    assert [o for o, _ in index.last_records(path, frozenset({"ok"}))] == [offsets[4],
                                                                          offsets[7]]


def test_files_on_disk_are_held_as_stem_hashes(tmp_path):
    (tmp_path / "n1" / "n2").mkdir(parents=True)
    for name in ("n1/a.jpg", "n1/.b.jpg.part", "n1/n2/c.png"):
        (tmp_path / name).write_bytes(b"x")
    found = StemIndex.scan(tmp_path, ["n1", "n9"])
    assert len(found.hashes) == 2
    assert found.contains([str(tmp_path / "n1" / "a"), str(tmp_path / "n1" / "n2" / "c"),
                           str(tmp_path / "n1" / "b")]) == [True, True, False]
    assert StemIndex.scan(tmp_path, ["n9"]).contains(["x"]) == [False]


def entry(number: int, klass: str = "n1", url: str = "", host: str = "") -> UrlEntry:
    """A URL of its own host (`h<number>`) unless a host or the whole URL is given."""
    url = url or f"http://{host or f'h{number}'}/{number}.jpg"
    return UrlEntry(f"{klass}_{number}", klass, url, klass)


def staged(out: Path, item: UrlEntry, body: bytes) -> Staged:
    """What a worker hands back: the body in its temp file beside its final name."""
    path = f"{target_stem(out, item)}.jpg"
    temp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.part")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Path(temp).write_bytes(body)
    return Staged("ok", "", len(body), hashlib.sha256(body).hexdigest(), temp, path)


def collect(options: GatherOptions, bodies: list[tuple[UrlEntry, bytes]]) -> Collector:
    with JsonLinesWriter(options.journal_path) as journal:
        collector = Collector(options, journal, JournalIndex.read(options.journal_path))
        for item, body in bodies:
            collector.record(item, outcome="ok", final=True,
                             staged=staged(options.out, item, body))
    return collector


def test_duplicates_are_found_per_class_and_across_a_resume(tmp_path):
    options = GatherOptions(out=tmp_path, placeholder_after=0)
    collect(options, [(entry(1), b"one"), (entry(2), b"two"), (entry(3), b"one"),
                      (entry(4, "n2"), b"one")])
    collector = collect(options, [(entry(5), b"two"), (entry(6), b"three")])
    journal = read_journal(options.journal_path)
    assert {i: r["outcome"] for i, r in journal.items()} == {
        "n1_1": "ok", "n1_2": "ok", "n1_3": "duplicate", "n2_4": "ok", "n1_5": "duplicate",
        "n1_6": "ok"}
    assert journal["n1_5"]["error"] == "same bytes as n1_2"
    assert sorted(p.name for p in tmp_path.rglob("*.jpg")) == ["n1_1.jpg", "n1_2.jpg",
                                                              "n1_6.jpg", "n2_4.jpg"]
    assert collector.ok_counts == {"n1": 3, "n2": 1}
    assert len(collector.kept.copies) == 6


def test_a_placeholder_takes_back_every_copy_kept_before_it_even_from_an_earlier_run(tmp_path):
    options = GatherOptions(out=tmp_path, placeholder_after=4)
    collect(options, [(entry(1), b"generic"), (entry(2), b"photo"), (entry(3), b"generic")])
    collector = collect(options, [(entry(4, "n2"), b"generic"), (entry(5), b"generic")])
    journal = read_journal(options.journal_path)
    assert {i: r["outcome"] for i, r in journal.items()} == {
        "n1_1": "placeholder", "n1_2": "ok", "n1_3": "placeholder", "n2_4": "placeholder",
        "n1_5": "placeholder"}
    assert "4 URLs" in journal["n1_5"]["error"]
    assert [p.name for p in tmp_path.glob("n*/*.jpg")] == ["n1_2.jpg"]
    digest = sha("generic")
    assert [p.stem for p in (tmp_path / ".placeholders").iterdir()] == [digest]
    assert (tmp_path / "placeholders.txt").read_text().split() == [digest]
    assert collector.ok_counts == {"n1": 1, "n2": 0}
    assert collector.kept.copies.offsets_of(digest) == []
    lines = [json.loads(line) for line in options.journal_path.read_text().splitlines()]
    assert sum(r["outcome"] == "placeholder" for r in lines) == 4


def test_the_same_url_twice_is_no_placeholder(tmp_path):
    options = GatherOptions(out=tmp_path, placeholder_after=2)
    same = "http://h/same.jpg"
    collect(options, [(entry(1, url=same), b"img"), (entry(2, url=same), b"img")])
    outcomes = {i: r["outcome"] for i, r in read_journal(options.journal_path).items()}
    assert outcomes == {"n1_1": "ok", "n1_2": "duplicate"}


def test_an_image_renamed_into_place_but_never_journaled_is_recovered(tmp_path):
    options = GatherOptions(out=tmp_path, min_size=16)
    items = [entry(1), entry(2), entry(3, "n2")]
    write_image(Path(f"{target_stem(tmp_path, items[1])}.jpg"), seed=1)
    with JsonLinesWriter(options.journal_path) as journal:
        collector = Collector(options, journal, JournalIndex.read(options.journal_path))
        rest = list(collector.recover_unjournaled(enumerate(items), {"n1", "n2"}))
    assert [item.id for _, item in rest] == ["n1_1", "n2_3"]
    record = read_journal(options.journal_path)["n1_2"]
    assert (record["outcome"], record["error"], record["path"]) == ("ok", "found on disk",
                                                                    "n1/n1_2.jpg")
    assert collector.kept.copies.offsets_of(record["sha256"]) == [0]


def stage(options: GatherOptions, item: UrlEntry, body: bytes) -> Staged:
    """A body checked, hashed and written as a gather worker does."""
    return stage_body(body, target_stem(options.out, item), options)


def gather_bodies(options: GatherOptions, bodies: list[tuple[UrlEntry, bytes]]) -> Collector:
    with JsonLinesWriter(options.journal_path) as journal:
        collector = Collector(options, journal, JournalIndex.read(options.journal_path))
        for item, body in bodies:
            collector.record(item, outcome="ok", final=True, staged=stage(options, item, body))
    return collector


def photo(seed: int) -> bytes:
    buffer = io.BytesIO()
    pattern(seed, (200, 150)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_a_placeholder_resized_and_re_encoded_per_url_is_found_by_its_perceptual_hash(
        tmp_path):
    options = GatherOptions(out=tmp_path, placeholder_after=3)
    generic = [serve_web.placeholder_jpeg("cdn.example", *variant)
               for variant in ((1.0, 85), (0.5, 60), (1.5, 92), (2.0, 70))]
    assert len({hashlib.sha256(body).hexdigest() for body in generic}) == 4
    cdn = "img2.cdn.example"  # one site, whichever of its hosts answers
    collector = gather_bodies(options, [
        (entry(1), photo(1)), (entry(2, host=cdn), generic[0]),
        (entry(3, "n2", host="img7.cdn.example"), generic[1]), (entry(4, host=cdn), photo(2)),
        (entry(5, "n3", host=cdn), generic[2])])
    outcomes = {i: r["outcome"] for i, r in read_journal(options.journal_path).items()}
    assert outcomes == {"n1_1": "ok", "n1_2": "placeholder", "n2_3": "placeholder",
                        "n1_4": "ok", "n3_5": "placeholder"}
    assert sorted(p.name for p in tmp_path.glob("n*/*")) == ["n1_1.jpg", "n1_4.jpg"]
    # the two copies kept before, each set aside under its own digest: nothing is lost
    set_aside = {p.read_bytes() for p in (tmp_path / ".placeholders").iterdir()}
    assert set_aside == {generic[0], generic[1]}
    known = read_placeholders(options.placeholders_path, FINGERPRINT_DIGITS)
    assert set(known) == {hashlib.sha256(body).hexdigest() for body in generic[:3]}
    assert {entry.site for entry in known.values()} == {"cdn.example"}
    assert collector.placeholders.found == 1 and collector.ok_counts == {"n1": 2, "n2": 0,
                                                                         "n3": 0}
    first = known[hashlib.sha256(generic[0]).hexdigest()].fingerprint
    assert len(collector.kept.near.offsets_near(int(first[:16], 16))) == 0  # out of the index too

    # A later run rejects another size of that picture from that site at once (one URL is
    # enough); the same picture from another site is a photo until it repeats there.
    collector = gather_bodies(options, [(entry(6, "n4", host=cdn), generic[3]),
                                        (entry(7, "n4"), photo(3)),
                                        (entry(8, "n4", host="elsewhere.example"),
                                         serve_web.placeholder_jpeg("cdn.example", 1.25, 75))])
    journal = read_journal(options.journal_path)
    assert journal["n4_6"]["outcome"] == "placeholder"
    assert "near-identical to a placeholder from cdn.example" in journal["n4_6"]["error"]
    assert journal["n4_8"]["outcome"] == "ok"
    assert collector.ok_counts["n4"] == 2


def product_shot(colour: tuple[int, int, int], radius: int) -> bytes:
    """A disc on white, centred: many real photos of one class look like this to a hash."""
    image = Image.new("RGB", (400, 300), (255, 255, 255))
    ImageDraw.Draw(image).ellipse((200 - radius, 150 - radius, 200 + radius, 150 + radius),
                                  fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def test_product_shots_alike_to_a_hash_are_no_placeholder_from_one_site_or_many(tmp_path):
    """Small objects of different colours on white: near-identical hashes, and a 2 x 2 grid of
    mean colours could not tell them apart (the background fills every cell)."""
    colours = [(200, 30, 30), (30, 30, 200), (30, 160, 30), (220, 200, 40)]
    options = GatherOptions(out=tmp_path, placeholder_after=3)
    shop = [(entry(n, host="shop.example"), product_shot(colour, 40))
            for n, colour in enumerate(colours)]
    sites = [(entry(10 + n, host=f"shop{n}.example"), product_shot(colours[0], 42 + n))
             for n in range(4)]  # near-identical, but each from a site of its own
    collector = gather_bodies(options, shop + sites)
    outcomes = Counter(r["outcome"] for r in read_journal(options.journal_path).values())
    assert outcomes == {"ok": 8} and collector.placeholders.found == 0


def test_a_kill_while_a_placeholder_was_taken_back_is_finished_by_the_next_run(tmp_path):
    """The body was listed in placeholders.txt and one copy set aside, then the run died
    before it journaled any take-back: the next run takes back what is still listed as kept."""
    options = GatherOptions(out=tmp_path, placeholder_after=0)
    collect(options, [(entry(1), b"generic"), (entry(2, "n2"), b"generic"),
                      (entry(3), b"photo")])
    digest = sha("generic")
    options.placeholders_path.write_text(f"{digest}\n")
    (tmp_path / ".placeholders").mkdir()
    os.replace(tmp_path / "n1" / "n1_1.jpg", tmp_path / ".placeholders" / f"{digest}.jpg")
    collector = collect(options, [])
    journal = read_journal(options.journal_path)
    assert {i: r["outcome"] for i, r in journal.items()} == {
        "n1_1": "placeholder", "n2_2": "placeholder", "n1_3": "ok"}
    assert sorted(p.name for p in tmp_path.glob("n*/*.jpg")) == ["n1_3.jpg"]
    assert [p.name for p in (tmp_path / ".placeholders").iterdir()] == [f"{digest}.jpg"]
    assert collector.ok_counts == {"n1": 1, "n2": 0}


@pytest.mark.parametrize("line", ["not-a-digest", "a" * 64 + " 12ab", "a" * 64 + " zz -"])
def test_a_damaged_placeholders_list_is_a_one_line_error_naming_the_line(tmp_path, line):
    options = GatherOptions(out=tmp_path)
    options.placeholders_path.write_text(f"{'b' * 64}\n{line}\n")
    with pytest.raises(InputError) as raised, JsonLinesWriter(options.journal_path) as journal:
        Collector(options, journal, JournalIndex.read(options.journal_path))
    assert str(raised.value).startswith(f"{options.placeholders_path}: line 2 is not")
    assert "delete that line" in str(raised.value)


def test_a_placeholders_line_cut_short_by_a_kill_is_skipped(tmp_path):
    options = GatherOptions(out=tmp_path)
    good = Fingerprint.of(Image.new("RGB", (128, 128), (9, 9, 9))).to_hex()
    options.placeholders_path.write_text(f"{'b' * 64} {good} cdn.example\n{'c' * 64} {good[:50]}")
    known = read_placeholders(options.placeholders_path, FINGERPRINT_DIGITS)
    assert list(known) == ["b" * 64] and known["b" * 64].site == "cdn.example"


def test_different_photos_that_look_alike_are_never_taken_for_a_placeholder(sample, tmp_path):
    """The sample's figures of one kind on similar backgrounds: a hard negative set."""
    options = GatherOptions(out=tmp_path, placeholder_after=2, min_size=16)
    files = sorted((sample / "files").rglob("*.jpg"))[:300]
    bodies = [(entry(n, path.parent.name), path.read_bytes()) for n, path in enumerate(files)]
    collector = gather_bodies(options, bodies)
    outcomes = Counter(r["outcome"] for r in read_journal(options.journal_path).values())
    assert outcomes == {"ok": len(files)}, outcomes
    assert collector.placeholders.found == 0 and len(collector.kept.near) == len(files)


def card(colours: tuple[tuple[int, int, int], tuple[int, int, int]], scale: float = 1.0
         ) -> bytes:
    """A framed caption on a plain background: the same brightness pattern in any pair of
    colours of the same luminance; `scale` resizes the picture."""
    ink, background = colours
    image = Image.new("RGB", (320, 240), background)
    draw = ImageDraw.Draw(image)
    draw.rectangle((20, 20, 299, 219), outline=ink, width=3)
    draw.text((160, 120), "no photo here", fill=ink, font=ImageFont.load_default(size=24),
              anchor="mm")
    if scale != 1.0:
        image = image.resize((round(320 * scale), round(240 * scale)), Image.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_pictures_alike_in_brightness_but_not_in_colour_are_no_placeholder(tmp_path):
    """The perceptual hashes see brightness only; the colour cells keep three different
    photos of the same layout apart, and still join the sizes of one picture."""
    schemes = [((60, 60, 60), (150, 150, 150)), ((190, 0, 220), (100, 160, 230)),
               ((20, 110, 20), (250, 120, 90))]
    options = GatherOptions(out=tmp_path, placeholder_after=3)
    gather_bodies(options, [(entry(n, host="one.example"), card(scheme))
                            for n, scheme in enumerate(schemes)])
    outcomes = {i: r["outcome"] for i, r in read_journal(options.journal_path).items()}
    assert outcomes == {"n1_0": "ok", "n1_1": "ok", "n1_2": "ok"}
    gather_bodies(options, [(entry(10 + n, "n2", host="one.example"), card(schemes[1], scale))
                            for n, scale in enumerate((0.75, 1.5))])
    outcomes = {i: r["outcome"] for i, r in read_journal(options.journal_path).items()}
    assert [outcomes[i] for i in ("n1_0", "n1_1", "n1_2", "n2_10", "n2_11")] == [
        "ok", "placeholder", "ok", "placeholder", "placeholder"]


def test_a_journal_with_an_unreadable_fingerprint_still_resumes(tmp_path):
    """An edited or foreign journal: the image is kept and just not compared by hash."""
    options = GatherOptions(out=tmp_path, placeholder_after=2)
    gather_bodies(options, [(entry(1, host="one.example"), photo(1))])
    lines = options.journal_path.read_text().splitlines()
    record = json.loads(lines[0])
    record["phash"] = "not hex at all"
    options.journal_path.write_text(json.dumps(record) + "\n")
    collector = gather_bodies(options, [(entry(2, host="one.example"), photo(2))])
    outcomes = {i: r["outcome"] for i, r in read_journal(options.journal_path).items()}
    assert outcomes == {"n1_1": "ok", "n1_2": "ok"}
    assert len(collector.kept.near) == 1 and len(collector.kept.copies) == 2

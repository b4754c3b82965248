"""`pipeline card`: a Croissant card of a dataset gathered from a real mirror, validated and
loaded with mlcroissant (MLCommons' own reader)."""

import csv
import hashlib
import json
import subprocess
import sys
from collections import Counter

import pytest

from pipeline.core.stage_options import ValidateOptions
from pipeline.formats.journal import read_journal
from pipeline.formats.manifest import read_manifest
from pipeline.stages.card import write_card
from pipeline.stages.gather import GatherOptions, gather_synsets
from pipeline.stages.label import label
from pipeline.stages.validate import validate
from pipeline.testing import make_sample
from pipeline.testing.serve_sample import serve_in_thread

mlc = pytest.importorskip("mlcroissant")  # the dev extra

MIX = {"404": 0.05, "noai": 0.05, "tdm": 0.05, "truncated": 0.05, "placeholder": 0.05}


@pytest.fixture(scope="module")
def built(sample, tmp_path_factory):
    """gather (robots.txt disallowing a few URLs) -> validate -> label, like the chain."""
    data = tmp_path_factory.mktemp("card")
    wnids = sorted(p.name for p in (sample / "files").iterdir())[:2]
    robots = {"*": {"/robots.txt": (200, "User-agent: *\nDisallow: /img/n90000001/n90000001_1")}}
    with serve_in_thread(sample, site_files=robots) as mirror:
        make_sample.build_url_list(sample, mirror.base_url, data / "urls.txt", wnids=wnids,
                                   mix=MIX)
        placeholder = hashlib.sha256((sample / "placeholder.png").read_bytes()).hexdigest()
        gather_synsets(data / "urls.txt", wnids, GatherOptions(
            out=data / "raw", concurrency=16, timeout=10.0, retries=1, backoff=0.05,
            placeholder_digests=frozenset({placeholder})))
    validate(data / "raw", ValidateOptions(quarantine=data / "rejected",
                                           report=data / "validate.jsonl"))
    label(data / "raw", data / "manifests", val_ratio=0.2)
    return data


def test_the_card_validates_and_loads_one_record_per_image_with_its_source(built):
    report = write_card(built / "manifests")
    manifests = built / "manifests"
    assert report.card == manifests / "croissant.json"
    dataset = mlc.Dataset(jsonld=str(report.card))  # raises on a card that does not validate
    records = list(dataset.records(record_set="images"))
    in_manifests = {(path, split) for split in ("train", "val")
                    for path in read_manifest(manifests / f"{split}.txt").paths.tolist()}
    assert len(records) == len(in_manifests) == report.images > 0

    def text(value):
        return value.decode() if isinstance(value, bytes) else str(value)

    journal = read_journal(built / "raw" / "gather.jsonl")
    by_path = {r["path"]: r for r in journal.values() if r["outcome"] == "ok"}
    seen = set()
    for record in records:
        path = text(record["images/path"])
        seen.add((path, text(record["images/split"])))
        assert text(record["images/source_url"]) == by_path[path]["url"]
        assert text(record["images/sha256"]) == hashlib.sha256(
            (built / "raw" / path).read_bytes()).hexdigest()
        assert text(record["images/wnid"]) == path.split("/")[0]
    assert seen == in_manifests
    assert report.with_source == report.images


def test_the_card_counts_what_each_stage_left_out_and_says_how_data_was_collected(built):
    write_card(built / "manifests")
    card = json.loads((built / "manifests" / "croissant.json").read_text())
    assert card["conformsTo"] == "http://mlcommons.org/croissant/1.0"
    left = {(row["left_out/stage"], row["left_out/reason"]): row["left_out/count"]
            for row in next(s for s in card["recordSet"] if s["@id"] == "left_out")["data"]}
    outcomes = Counter(r["outcome"] for r in read_journal(built / "raw" / "gather.jsonl").values())
    for outcome in ("dead", "opted_out", "placeholder", "not_image"):
        assert left[("gather", outcome)] == outcomes[outcome] > 0, outcome
    robots_refused = [r for r in read_journal(built / "raw" / "gather.jsonl").values()
                      if r["error"].startswith("robots.txt:")]
    assert robots_refused  # robots.txt opt-outs are among the opted_out counted
    assert "robots.txt" in card["rai:dataCollection"]
    assert card["rai:dataCollectionType"] == ["Web Scraping"]
    start, end = card["rai:dataCollectionTimeframe"]
    assert start <= end and start.endswith("Z")
    files = {f["@id"]: f for f in card["distribution"]}
    for name in ("train.txt", "val.txt", "labels.txt", "images.csv"):
        digest = hashlib.sha256((built / "manifests" / name).read_bytes()).hexdigest()
        assert files[name]["sha256"] == digest


def test_images_without_a_journal_get_a_card_without_sources(built, tmp_path):
    root = tmp_path / "folders"
    classes = sorted(d for d in (built / "raw").iterdir() if d.is_dir() and d.name[0] != ".")
    for path in [p for folder in classes for p in sorted(folder.glob("*.jpg"))[:3]]:
        (root / path.parent.name).mkdir(parents=True, exist_ok=True)
        (root / path.parent.name / path.name).write_bytes(path.read_bytes())
    label(root, tmp_path / "manifests", val_ratio=0.0)
    report = write_card(tmp_path / "manifests")
    assert report.with_source == 0
    rows = list(csv.DictReader((tmp_path / "manifests" / "images.csv").open()))
    assert len(rows) == 6 and all(row["source_url"] == "" for row in rows)
    card = json.loads(report.card.read_text())
    assert card["rai:dataCollectionType"] == ["Others"]
    mlc.Dataset(jsonld=str(report.card))


def test_the_command_writes_the_card_and_refuses_a_folder_without_manifests(built, tmp_path):
    done = subprocess.run([sys.executable, "-m", "pipeline", "card", str(built / "manifests")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "croissant.json" in done.stdout
    missing = subprocess.run([sys.executable, "-m", "pipeline", "card", str(tmp_path)],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert "pipeline label" in missing.stderr

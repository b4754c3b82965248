"""`pipeline card`: a Croissant 1.0 dataset card for the built dataset.

Croissant (MLCommons' JSON-LD format, read by Hugging Face, Kaggle and OpenML) is what tools
load a dataset's description from; its Responsible-AI fields say how the data was collected.
The card describes what `label` put in the manifests, and where each image came from:

- `MANIFESTS/images.csv`: one row per image in the manifests: its path (relative to the
  dataset root), split, label, wnid and class name, SHA-256 (of the file as it is now), the
  URL it was fetched from and when (from gather's journal; empty for images that did not come
  through gather), and its quality flags (quality.csv).
- `MANIFESTS/croissant.json`: the card: the manifests and images.csv as files with their
  SHA-256, record sets `images` (from images.csv), `classes` and `left_out` (how many URLs or
  files each stage left out, and why: dead links, placeholders, duplicates, opt-outs,
  unreadable files, quality), the collection time frame, and the RAI fields.

Written atomically; a rerun rewrites both (they are derived from the files beside them).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import __version__
from pipeline.core.errors import InputError
from pipeline.core.fsutil import atomic_write_text
from pipeline.core.stage_options import VALIDATE
from pipeline.formats.journal import JOURNAL_NAME, JournalIndex, iter_journal, outcome_of
from pipeline.formats.manifest import (
    CONFLICTS_FILE,
    LABELS_FILE,
    QUALITY_FILE,
    ClassRecord,
    display_name,
    manifest_root,
    read_conflicts,
    read_labels,
    read_manifest,
    read_quality_table,
)

CARD_FILE = "croissant.json"
RECORDS_FILE = "images.csv"
RECORDS_HEADER = ("path", "split", "label", "wnid", "class_name", "sha256", "source_url",
                  "fetched", "quality_flags")
SPLITS = ("train", "val")
HASH_THREADS = 4  # hashlib releases the GIL: reading and hashing overlap across files
CONFORMS_TO = "http://mlcommons.org/croissant/1.0"
# Croissant 1.0's standard JSON-LD context, with the RAI namespace.
CONTEXT: dict[str, Any] = {
    "@language": "en", "@vocab": "https://schema.org/", "citeAs": "cr:citeAs",
    "column": "cr:column", "conformsTo": "dct:conformsTo", "cr": "http://mlcommons.org/croissant/",
    "rai": "http://mlcommons.org/croissant/RAI/",
    "data": {"@id": "cr:data", "@type": "@json"},
    "dataType": {"@id": "cr:dataType", "@type": "@vocab"}, "dct": "http://purl.org/dc/terms/",
    "equivalentProperty": "cr:equivalentProperty",
    "examples": {"@id": "cr:examples", "@type": "@json"}, "extract": "cr:extract",
    "field": "cr:field", "fileProperty": "cr:fileProperty", "fileObject": "cr:fileObject",
    "fileSet": "cr:fileSet", "format": "cr:format", "includes": "cr:includes",
    "isLiveDataset": "cr:isLiveDataset", "jsonPath": "cr:jsonPath", "key": "cr:key",
    "md5": "cr:md5", "parentField": "cr:parentField", "path": "cr:path",
    "recordSet": "cr:recordSet", "references": "cr:references", "regex": "cr:regex",
    "repeated": "cr:repeated", "replace": "cr:replace", "samplingRate": "cr:samplingRate",
    "sc": "https://schema.org/", "separator": "cr:separator", "source": "cr:source",
    "subField": "cr:subField", "transform": "cr:transform",
}
IMAGENET_CITATION = (
    "@inproceedings{deng2009imagenet, title={ImageNet: A large-scale hierarchical image "
    "database}, author={Deng, Jia and Dong, Wei and Socher, Richard and Li, Li-Jia and Li, "
    "Kai and Fei-Fei, Li}, booktitle={CVPR}, year={2009}}")
DEFAULT_LICENSE = ("Each image remains the work of its owner under the terms of the page it "
                   "was fetched from (source_url); this card grants no license to the images.")


@dataclass
class Source:
    """Where an image came from: gather's journal record of it."""

    url: str
    fetched: str  # ISO 8601, UTC


@dataclass
class CardReport:
    card: Path
    records: Path
    images: int
    with_source: int
    left_out: Counter[tuple[str, str]] = field(default_factory=Counter)  # (stage, reason)

    def summary(self) -> str:
        left = sum(self.left_out.values())
        return (f"wrote {self.card} and {self.records}: {self.images} image(s), "
                f"{self.with_source} with their source URL; {left} left out along the way "
                "(counted by reason in the card)")


def write_card(manifests: Path, *, name: str | None = None, description: str | None = None,
               license_text: str = DEFAULT_LICENSE, journal: Path | None = None,
               validate_log: Path | None = None, workers: int = HASH_THREADS) -> CardReport:
    """Describe the dataset of `manifests` (written by `pipeline label`) as a Croissant card.
    `journal` (gather's, default ROOT/gather.jsonl) and `validate_log` (default
    ROOT/../validate.jsonl) are read when they exist."""
    classes = read_labels(manifests)
    root = manifest_root(manifests)
    rows = _manifest_rows(manifests, classes)
    if not rows:
        raise InputError(f"{manifests}: the manifests list no image (run `pipeline label` "
                         "on a folder with images first)")
    journal = journal or root / JOURNAL_NAME
    sources, gather_left, timeframe = _read_journal(journal)
    left_out = gather_left + _validate_left_out(validate_log or VALIDATE.report_of(root))
    quality = _quality_rows(manifests)
    left_out += _label_left_out(manifests, quality)
    flags = {row["path"]: row["flags"] for row in quality}
    digests = _sha256_all([root / path for path, _, _ in rows], workers)
    records = manifests / RECORDS_FILE
    with_source = _write_records(records, rows, classes, digests, sources, flags)
    card = manifests / CARD_FILE
    document = _card(manifests, classes, rows, left_out, timeframe, name=name,
                     description=description, license_text=license_text,
                     has_source=bool(sources))
    atomic_write_text(card, json.dumps(document, indent=1, ensure_ascii=False) + "\n")
    return CardReport(card, records, len(rows), with_source, left_out)


def _manifest_rows(manifests: Path, classes: list[ClassRecord]) -> list[tuple[str, str, int]]:
    """(path, split, label) of every image in the manifests, split by split."""
    rows = []
    for split in SPLITS:
        path = manifests / f"{split}.txt"
        if not path.exists():
            continue
        manifest = read_manifest(path)
        for image, label in zip(manifest.paths.tolist(), manifest.labels.tolist(), strict=True):
            if not 0 <= label < len(classes):
                raise InputError(f"{path}: label {label} of {image} is not in "
                                 f"{manifests / LABELS_FILE} (run `pipeline label` again)")
            rows.append((image, split, label))
    return rows


def _read_journal(path: Path) -> tuple[dict[str, Source], Counter[tuple[str, str]],
                                       tuple[str, str] | None]:
    """Per kept path its source; the URLs gather left out, by outcome (each URL's last
    line); the time frame of the fetches. Streams the journal: its compact index, then the
    kept images' lines and the times."""
    if not path.exists():
        return {}, Counter(), None
    index = JournalIndex.read(path)
    sources = {record["path"]: Source(record["url"], _iso(record.get("time")))
               for _, record in index.last_records(path, frozenset({"ok"}))
               if record.get("path")}
    codes, counts = np.unique(index.codes, return_counts=True)
    left = Counter({("gather", outcome_of(int(code)) or "unknown"): int(count)
                    for code, count in zip(codes.tolist(), counts.tolist(), strict=True)
                    if outcome_of(int(code)) != "ok"})
    first, last = float("inf"), 0.0
    for _, record in iter_journal(path):
        when = record.get("time") or 0.0
        first, last = (min(first, when), max(last, when)) if when else (first, last)
    timeframe = (_iso(first), _iso(last)) if last else None
    return sources, left, timeframe


def _validate_left_out(path: Path) -> Counter[tuple[str, str]]:
    """validate's quarantined files by reason (the log's lines; a file quarantined twice
    counts once)."""
    if not path.exists():
        return Counter()
    reasons: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
            reasons[entry["path"]] = entry["reason"]
        except (ValueError, KeyError, TypeError):
            continue
    return Counter(("validate", reason) for reason in reasons.values())


def _label_left_out(manifests: Path, quality: list[dict[str, str]]
                    ) -> Counter[tuple[str, str]]:
    """label's drops: copies across classes (conflicts.txt) and --drop-quality (quality.csv)."""
    left: Counter[tuple[str, str]] = Counter()
    if (manifests / CONFLICTS_FILE).exists():
        left["label", "cross_class_duplicate"] = sum(
            row["action"] == "dropped" for row in read_conflicts(manifests))
    left["label", "quality"] = sum(row["dropped"] == "yes" for row in quality)
    return +left


def _quality_rows(manifests: Path) -> list[dict[str, str]]:
    return read_quality_table(manifests) if (manifests / QUALITY_FILE).exists() else []


def _sha256_all(paths: list[Path], workers: int) -> list[str]:
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(_sha256, paths, chunksize=64))


def _sha256(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError as exc:
        raise InputError(f"{path} is in the manifests but cannot be read ({exc.strerror}): "
                         "run `pipeline label` again") from None


def _write_records(path: Path, rows: list[tuple[str, str, int]], classes: list[ClassRecord],
                   digests: list[str], sources: dict[str, Source],
                   flags: dict[str, str]) -> int:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(RECORDS_HEADER)
    with_source = 0
    for (image, split, label), digest in zip(rows, digests, strict=True):
        klass = classes[label]
        source = sources.get(image)
        with_source += source is not None
        writer.writerow([image, split, label, klass.wnid, display_name(klass.name), digest,
                         source.url if source else "", source.fetched if source else "",
                         flags.get(image, "")])
    atomic_write_text(path, text.getvalue())
    return with_source


def _card(manifests: Path, classes: list[ClassRecord], rows: list[tuple[str, str, int]],
          left_out: Counter[tuple[str, str]], timeframe: tuple[str, str] | None, *,
          name: str | None, description: str | None, license_text: str,
          has_source: bool) -> dict[str, Any]:
    counts = Counter(split for _, split, _ in rows)
    wnids = ", ".join(f"{c.wnid} ({display_name(c.name) or c.wnid})" for c in classes[:20])
    more = f" and {len(classes) - 20} more" if len(classes) > 20 else ""
    document: dict[str, Any] = {
        "@context": CONTEXT,
        "@type": "sc:Dataset",
        "name": name or f"imagenet-{len(classes)}-classes",
        "description": description or (
            f"{len(rows)} images of {len(classes)} ImageNet synsets ({wnids}{more}): "
            + ", ".join(f"{counts[s]} {s}" for s in SPLITS if counts[s])
            + f". Built by pipeline {__version__} (gather, validate, label)."),
        "conformsTo": CONFORMS_TO,
        "version": "1.0.0",
        "datePublished": _iso(datetime.now(UTC).timestamp()),
        "license": license_text,
        "citeAs": IMAGENET_CITATION,
        "url": "https://image-net.org/",
        "distribution": [*_manifest_files(manifests), _records_file(manifests)],
        # Croissant refuses a record set without records: none when nothing was left out.
        "recordSet": [_classes_set(classes), _images_set(),
                      *([_left_out_set(left_out)] if left_out else [])],
        **_rai_fields(left_out, timeframe, has_source),
    }
    return document


def _manifest_files(manifests: Path) -> list[dict[str, Any]]:
    files = []
    for file_name in (f"{split}.txt" for split in SPLITS):
        path = manifests / file_name
        if path.exists():
            files.append(_file_object(path, "text/plain",
                                      "'path label' lines: the images of the split"))
    files.append(_file_object(manifests / LABELS_FILE, "text/plain",
                              "'index wnid name' lines: the label map"))
    return files


def _records_file(manifests: Path) -> dict[str, Any]:
    return _file_object(manifests / RECORDS_FILE, "text/csv",
                        "One row per image: path, split, label, class, SHA-256, source URL, "
                        "fetch time, quality flags.")


def _file_object(path: Path, encoding: str, description: str) -> dict[str, Any]:
    return {"@type": "cr:FileObject", "@id": path.name, "name": path.name,
            "description": description, "contentUrl": path.name, "encodingFormat": encoding,
            "contentSize": f"{os.path.getsize(path)} B", "sha256": _sha256(path)}


def _images_set() -> dict[str, Any]:
    described = {
        "path": ("sc:Text", "The image file, relative to the dataset root (root.txt)."),
        "split": ("sc:Text", "train or val."),
        "label": ("sc:Integer", "The class index (classes/label)."),
        "wnid": ("sc:Text", "The class's WordNet id."),
        "class_name": ("sc:Text", "The class's name."),
        "sha256": ("sc:Text", "SHA-256 of the image file."),
        "source_url": ("sc:URL", "The URL it was fetched from (empty: not fetched by gather)."),
        "fetched": ("sc:Text", "When it was fetched (ISO 8601, UTC)."),
        "quality_flags": ("sc:Text", "label's quality flags, space-separated."),
    }
    return {"@type": "cr:RecordSet", "@id": "images", "name": "images",
            "description": "One record per image in the manifests.", "key": {"@id": "images/path"},
            "field": [{"@type": "cr:Field", "@id": f"images/{column}", "name": column,
                       "description": text, "dataType": data_type,
                       "source": {"fileObject": {"@id": RECORDS_FILE},
                                  "extract": {"column": column}}}
                      for column, (data_type, text) in described.items()]}


def _classes_set(classes: list[ClassRecord]) -> dict[str, Any]:
    return {"@type": "cr:RecordSet", "@id": "classes", "name": "classes",
            "description": "The label map.", "key": {"@id": "classes/label"},
            "field": [_inline_field("classes", "label", "sc:Integer"),
                      _inline_field("classes", "wnid", "sc:Text"),
                      _inline_field("classes", "name", "sc:Text")],
            "data": [{"classes/label": c.index, "classes/wnid": c.wnid,
                      "classes/name": c.name} for c in classes]}


def _left_out_set(left_out: Counter[tuple[str, str]]) -> dict[str, Any]:
    return {"@type": "cr:RecordSet", "@id": "left_out", "name": "left_out",
            "description": "URLs or files left out of the dataset, by the stage that left them "
                           "out and why (gather's journal outcomes, validate's quarantine "
                           "reasons, label's drops). opted_out: the site's robots.txt, TDMRep "
                           "or X-Robots-Tag refused it.",
            "field": [_inline_field("left_out", "stage", "sc:Text"),
                      _inline_field("left_out", "reason", "sc:Text"),
                      _inline_field("left_out", "count", "sc:Integer")],
            "data": [{"left_out/stage": stage, "left_out/reason": reason,
                      "left_out/count": count}
                     for (stage, reason), count in sorted(left_out.items())]}


def _inline_field(record_set: str, name: str, data_type: str) -> dict[str, Any]:
    return {"@type": "cr:Field", "@id": f"{record_set}/{name}", "name": name,
            "dataType": data_type}


def _rai_fields(left_out: Counter[tuple[str, str]], timeframe: tuple[str, str] | None,
                has_source: bool) -> dict[str, Any]:
    gathered = sum(count for (stage, _), count in left_out.items() if stage == "gather")
    opted_out = left_out["gather", "opted_out"]
    collection = (
        "Downloaded by `pipeline gather` from the ImageNet URL lists (fall11_urls.txt): photos "
        "on the public web, most of them on Flickr, listed in 2011. Each host's robots.txt "
        "(RFC 9309) and TDMRep reservation (/.well-known/tdmrep.json and the tdm-reservation "
        "header) were asked before its images, and X-Robots-Tag noai/noimageai was read with "
        "each: a refused URL was never requested or kept"
        + (f" ({opted_out} URL(s) were refused)" if opted_out else "")
        + ". The User-Agent named the tool and, when given, the operator's contact. Dead "
          f"links, placeholders and duplicates were left out ({gathered} URL(s) in all, by "
          "reason in the left_out record set).") if has_source else (
        "The images were given as class folders; no source URL is known for them.")
    fields: dict[str, Any] = {
        "rai:dataCollection": collection,
        "rai:dataCollectionType": ["Web Scraping"] if has_source else ["Others"],
        "rai:dataPreprocessingProtocol": [
            "validate: every image fully decoded; unreadable, truncated, decompression-bomb "
            "and too-small files quarantined (moved aside, never deleted).",
            "label: byte-identical and near-identical (perceptual hash) copies kept on one "
            "side of the train/val split; copies across classes dropped; quality flags "
            "(dark, bright, blurry, low information, odd aspect, grayscale) measured and, "
            "with --drop-quality, the flagged images dropped.",
        ],
        "rai:dataAnnotationProtocol": (
            "No human annotation: an image's label is the synset whose URL list it came from "
            "(ImageNet's own labelling, 2009-2011)."),
        "rai:dataLimitations": (
            "Photos from a 2011 list that are still online today: a biased survivor sample. "
            "Labels are not verified; near-duplicate detection can miss heavily edited "
            "copies."),
        "rai:dataBiases": (
            "Inherits ImageNet's: mostly Western, English-language photo sites, and the "
            "photographers and subjects of 2000s Flickr."),
        "rai:personalSensitiveInformation": (
            "Not screened: web photos may show people, faces, licence plates or homes."),
        "rai:dataUseCases": "Fine-tuning and evaluating image classifiers for research.",
    }
    if timeframe is not None:
        fields["rai:dataCollectionTimeframe"] = list(timeframe)
    return fields


def _iso(timestamp: float | None) -> str:
    if not timestamp:
        return ""
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds").replace(
        "+00:00", "Z")

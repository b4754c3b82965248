"""`pipeline report`: one self-contained HTML page (and its PNGs) about a training run.

It gathers what a user wants to see after the chain: what the download kept and dropped and
why, the classes, the mean image, sample images, the learning curves (of several runs side
by side, e.g. fine-tuned vs from scratch), the confusion matrix and misclassified images.

It only reads what the stages wrote (the run folder, the manifests, the gather journal,
`pipeline evaluate`'s folder) and computes nothing about the model. Each section is read,
then plotted, then turned into HTML, in that order and by separate functions.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import InputError
from pipeline.core.fsutil import atomic_open, atomic_write_text
from pipeline.core.images import ImageDecodeError
from pipeline.core.quality import FLAGS
from pipeline.formats import runfolder
from pipeline.formats.journal import (
    JOURNAL_NAME,
    PLACEHOLDERS_NAME,
    read_journal,
    read_placeholders,
)
from pipeline.formats.manifest import (
    ClassRecord,
    DuplicateGroup,
    Manifest,
    display_name,
    has_labels,
    read_conflicts,
    read_duplicates,
    read_labels,
    read_manifest,
    read_quality_table,
)
from pipeline.formats.packfile import is_packfile, manifest_of
from pipeline.formats.urllist import HYPONYM_CONFLICTS_NAME, read_hyponym_conflicts
from pipeline.ml.preprocess import load_square

log = logging.getLogger(__name__)

SAMPLES_PER_CLASS = 6
DUPLICATE_ROWS = 4  # duplicate groups shown as thumbnails


# -- reading

@dataclass
class RunInfo:
    name: str
    folder: Path
    config: dict[str, Any]
    log: list[dict[str, float]]
    feature_cache: dict[str, Any] | None

    @property
    def best_top1(self) -> float:
        return max((row.get("val_top1", 0.0) for row in self.log), default=0.0)

    @property
    def final_top1(self) -> float:
        return self.log[-1].get("val_top1", 0.0) if self.log else 0.0


def read_run(folder: Path) -> RunInfo:
    try:
        config = json.loads((folder / runfolder.CONFIG).read_text(encoding="utf-8"))
        with open(folder / runfolder.LOG, newline="", encoding="utf-8") as handle:
            rows = [{k: float(v) for k, v in row.items() if v not in ("", None)}
                    for row in csv.DictReader(handle)]
    except (OSError, ValueError) as exc:
        raise InputError(f"{folder} is not a finished `pipeline finetune` run: {exc}") from None
    metrics_path = folder / runfolder.METRICS
    metrics = (json.loads(metrics_path.read_text(encoding="utf-8"))
               if metrics_path.exists() else {})
    return RunInfo(folder.name, folder, config, rows, metrics.get("feature_cache"))


@dataclass
class ClassesInfo:
    classes: list[ClassRecord]
    train: Manifest
    val_counts: Counter[int]


def read_classes(manifest_dir: Path) -> ClassesInfo:
    val_path = manifest_dir / "val.txt"
    val = Counter(read_manifest(val_path).labels.tolist()) if val_path.exists() else Counter()
    return ClassesInfo(read_labels(manifest_dir), read_manifest(manifest_dir / "train.txt"), val)


def read_gather(journal: Path) -> dict[str, Counter[str]]:
    """Outcome counts per class over the journal (the last record of each URL)."""
    per_class: dict[str, Counter[str]] = defaultdict(Counter)
    for record in read_journal(journal).values():
        per_class[record.get("class", record.get("wnid", "?"))][record["outcome"]] += 1
    return per_class


@dataclass
class QualityInfo:
    """What label and gather found wrong with the data, as they wrote it."""

    root: Path
    duplicates: list[DuplicateGroup]
    conflicts: list[dict[str, str]]  # conflicts.txt rows
    hyponym_conflicts: list[dict[str, str]]  # hyponym_conflicts.txt rows
    placeholders: int  # bodies listed in placeholders.txt
    placeholder_urls: int  # journal records with the outcome placeholder
    flagged: list[dict[str, str]]  # quality.csv rows


def read_quality(manifest_dir: Path, root: Path) -> QualityInfo:
    hyponyms = root / HYPONYM_CONFLICTS_NAME
    digests = root / PLACEHOLDERS_NAME
    journal = root / JOURNAL_NAME
    return QualityInfo(
        root, read_duplicates(manifest_dir), read_conflicts(manifest_dir),
        read_hyponym_conflicts(hyponyms) if hyponyms.exists() else [],
        len(read_placeholders(digests)),
        sum(r["outcome"] == "placeholder" for r in read_journal(journal).values())
        if journal.exists() else 0,
        read_quality_table(manifest_dir))


@dataclass
class EvaluationInfo:
    data: str
    folder: Path
    figures: dict[str, Any]  # eval.json as `pipeline evaluate` wrote it

    @property
    def names(self) -> dict[str, str]:
        return {c["wnid"]: display_name(c["name"]) for c in self.figures.get("classes", [])}


def read_evaluation(run: RunInfo) -> EvaluationInfo | None:
    """`pipeline evaluate`'s output for the run's validation data, in its default folder."""
    val = run.config.get("val")
    if not val:
        return None
    folder = runfolder.eval_folder(run.folder, val)
    if not (folder / runfolder.EVAL_JSON).exists():
        log.info("report: no evaluation in %s (run `pipeline evaluate` first to include it)",
                 folder)
        return None
    return EvaluationInfo(str(val), folder,
                          json.loads((folder / runfolder.EVAL_JSON).read_text(encoding="utf-8")))


def _manifest_dir(train: Path) -> Path:
    """The manifests folder behind the training data (a manifest, or a pack that names one)."""
    return manifest_of(train).parent if is_packfile(train) else train.parent


def _mean_png(config: dict[str, Any]) -> Path | None:
    mean = str(config.get("mean", ""))
    if mean.endswith(".npy") and Path(mean).with_suffix(".png").exists():
        return Path(mean).with_suffix(".png")
    return None


# -- the page

def build_report(run_dir: Path, *, compare: list[Path] | None = None,
                 out: Path | None = None, title: str | None = None,
                 mean_image: Path | None = None) -> Path:
    """Write OUT/report.html plus one PNG per figure; returns the HTML path."""
    run = read_run(run_dir)
    others = [read_run(folder) for folder in compare or []]
    out = out or run_dir
    out.mkdir(parents=True, exist_ok=True)
    manifest_dir = _manifest_dir(Path(run.config["train"]))
    sections = [_summary_section(run, others)]
    plot_curves([run, *others], out / "curves.png")
    sections.append(_figure("Training and validation curves", out / "curves.png", "", out))
    if has_labels(manifest_dir):
        classes = read_classes(manifest_dir)
        plot_samples(classes, out / "samples.png")
        sections.append(_classes_section(classes, out))
        journal = classes.train.root / JOURNAL_NAME
        if journal.exists():
            per_class = read_gather(journal)
            plot_gather(per_class, out / "gather.png")
            sections.append(_gather_section(per_class, out))
        quality = read_quality(manifest_dir, classes.train.root)
        if quality.duplicates:
            plot_duplicates(quality, out / "duplicates.png")
        if any(row["flags"] for row in quality.flagged):
            plot_quality_flags(quality, out / "quality_flags.png")
        sections.append(_quality_section(quality, out))
    mean_png = mean_image or _mean_png(run.config)
    if mean_png is not None:
        sections.append(_figure("Mean image (the training set's, after resize/crop)",
                                mean_png, "mean.png", out))
    evaluation = read_evaluation(run)
    if evaluation is not None:
        sections.extend(_evaluation_sections(evaluation, out))
    page = _page(title or f"pipeline report: {run.name}", sections)
    atomic_write_text(out / "report.html", page)
    return out / "report.html"


def _summary_section(run: RunInfo, others: list[RunInfo]) -> str:
    rows = [["run", "weights", "frozen until", "epochs", "final val top-1", "best val top-1"]]
    for info in [run, *others]:
        rows.append([info.name, str(info.config.get("weights")),
                     str(info.config.get("freeze_until")), str(len(info.log)),
                     f"{info.final_top1:.1%}", f"{info.best_top1:.1%}"])
    verdict = ""
    if others:
        gaps = ", ".join(f"{run.best_top1 - o.best_top1:+.1%} vs {o.name}" for o in others)
        verdict = f"<p><b>{html.escape(run.name)}</b>: {html.escape(gaps)} (best val top-1).</p>"
    return "<h2>Runs</h2>" + _table(rows) + verdict + _cache_note(run.feature_cache)


def _cache_note(cache: dict[str, Any] | None) -> str:
    """Whether the frozen-trunk feature cache was used, and what it saved."""
    if not cache:
        return "<p>Feature cache: not used (every epoch ran the frozen layers).</p>"
    how = ("reused from an earlier run" if cache["reused"]
           else f"built in {cache['build_seconds']:.0f} s, paid back after "
                f"{cache.get('break_even_epochs', '?')} epoch(s)")
    return (f"<p>Feature cache: used ({cache['views']} views per image, {cache['dtype']}, "
            f"{cache['bytes'] / 2**20:.0f} MB, {html.escape(how)}); the frozen layers' work "
            f"it saved this run: about {cache['trunk_seconds_saved_estimate']:.0f} s.</p>")


def _classes_section(info: ClassesInfo, out: Path) -> str:
    train_counts = Counter(info.train.labels.tolist())
    rows = [["index", "class", "name", "train", "val"]]
    rows += [[str(c.index), c.wnid, c.display_name, str(train_counts.get(c.index, 0)),
              str(info.val_counts.get(c.index, 0))] for c in info.classes]
    return ("<h2>Classes</h2>" + _table(rows)
            + _figure("Sample training images per class", out / "samples.png", "", out))


def _gather_section(per_class: dict[str, Counter[str]], out: Path) -> str:
    outcomes = _outcome_order(per_class)
    rows = [["class", *outcomes]] + [[klass, *(str(per_class[klass][o]) for o in outcomes)]
                                     for klass in sorted(per_class)]
    return ("<h2>Download: kept and dropped</h2>" + _table(rows)
            + _figure("What happened to every URL", out / "gather.png", "", out))


def _quality_section(quality: QualityInfo, out: Path) -> str:
    perceptual = sum(group.how == "perceptual" for group in quality.duplicates)
    dropped = sum(row["action"] == "dropped" for row in quality.conflicts)
    cross = len({row["group"] for row in quality.conflicts})
    items = [f"{len(quality.duplicates)} group(s) of copies, each kept on one side of the "
             f"split ({perceptual} found by the perceptual hash, the rest identical bytes; "
             "duplicates.txt)",
             f"{cross} group(s) of copies across classes, {dropped} file(s) left out of the "
             "manifests (conflicts.txt)",
             f"{len(quality.hyponym_conflicts)} hyponym(s) under two requested classes "
             f"({HYPONYM_CONFLICTS_NAME})",
             f"{quality.placeholders} placeholder body(ies) listed in {PLACEHOLDERS_NAME} "
             "(each size or encoding of a repeated picture counts), "
             f"{quality.placeholder_urls} URL(s) journaled as placeholder"]
    body = "<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in items) + "</ul>"
    if quality.conflicts:
        rows = [["group", "how", "class", "path", "action"]]
        rows += [[r["group"], r["how"], r["class"], r["path"], r["action"]]
                 for r in quality.conflicts]
        body += _table(rows)
    if quality.hyponym_conflicts:
        rows = [["synset", "classes", "URLs", "resolution"]]
        rows += [[r["synset"], r["classes"], r["urls"], r["resolution"]]
                 for r in quality.hyponym_conflicts]
        body += _table(rows)
    if quality.duplicates:
        body += _figure(f"The first {min(DUPLICATE_ROWS, len(quality.duplicates))} group(s) "
                        "of copies", out / "duplicates.png", "", out)
    if any(row["flags"] for row in quality.flagged):
        body += _quality_flags_table(quality.flagged)
        body += _figure("A few images per quality flag", out / "quality_flags.png", "", out)
    return "<h2>Data quality</h2>" + body


def _quality_flags_table(rows: list[dict[str, str]]) -> str:
    """Images per class and flag (quality.csv), and how many --drop-quality left out."""
    counts: dict[str, Counter[str]] = {}
    for row in rows:
        per_class = counts.setdefault(row["class"], Counter())
        per_class.update(row["flags"].split())
        per_class["left out"] += row["dropped"] == "yes"
    shown = [flag for flag in (*FLAGS, "left out") if any(c[flag] for c in counts.values())]
    table = [["class", *shown]] + [[klass, *(str(c[flag]) for flag in shown)]
                                   for klass, c in sorted(counts.items())]
    return "<p>Quality flags per class (quality.csv):</p>" + _table(table)


def _evaluation_sections(evaluation: EvaluationInfo, out: Path) -> list[str]:
    result, names = evaluation.figures, evaluation.names
    per_class = result.get("per_class_top1", {})
    # With five classes or fewer top-5 is always 100%: it says nothing, so it is not shown.
    top5 = f", top-5 {result['top5']:.1%}" if len(per_class) > 5 else ""
    rows = [["class", "name", "top-1"]] + [[wnid, names.get(wnid, ""), f"{accuracy:.1%}"]
                                          for wnid, accuracy in per_class.items()]
    sections = [f"<h2>Evaluation of best.pt on {html.escape(evaluation.data)}</h2>"
                f"<p>{result['images']} images: top-1 {result['top1']:.1%}{top5}, "
                f"loss {result['loss']:.3f}</p>",
                "<div style='display:flex;gap:2em;align-items:flex-start'>"
                + _table(rows)
                + _figure("Confusion matrix", evaluation.folder / runfolder.CONFUSION_PNG, "", out)
                + "</div>"]
    misclassified = evaluation.folder / runfolder.MISCLASSIFIED_PNG
    if misclassified.exists():
        sections.append(_figure("Misclassified validation images (true class → predicted)",
                                misclassified, runfolder.MISCLASSIFIED_PNG, out))
    return sections


# -- plotting

def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def plot_curves(runs: list[RunInfo], path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    figure, (loss_axes, acc_axes) = _pyplot().subplots(1, 2, figsize=(11, 4))
    for info in runs:
        epochs = [row["epoch"] for row in info.log]
        loss_axes.plot(epochs, [r.get("train_loss") for r in info.log], "--",
                       label=f"{info.name} train")
        if any("val_loss" in r for r in info.log):
            loss_axes.plot(epochs, [r.get("val_loss") for r in info.log],
                           label=f"{info.name} val")
            acc_axes.plot(epochs, [r.get("val_top1") for r in info.log], marker="o",
                          label=f"{info.name} val top-1")
        acc_axes.plot(epochs, [r.get("train_top1") for r in info.log], ":",
                      label=f"{info.name} train top-1")
    loss_axes.set(xlabel="epoch", ylabel="loss", title="Loss")
    acc_axes.set(xlabel="epoch", ylabel="accuracy", title="Accuracy", ylim=(0, 1))
    for axes in (loss_axes, acc_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.legend(fontsize=8)
        axes.grid(alpha=0.3)
    _save_figure(figure, path)


def plot_samples(info: ClassesInfo, path: Path) -> None:
    figure, grid = _pyplot().subplots(len(info.classes), SAMPLES_PER_CLASS,
                                      figsize=(SAMPLES_PER_CLASS * 1.2,
                                               len(info.classes) * 1.25),
                                      squeeze=False)
    for klass, axes_row in zip(info.classes, grid, strict=True):
        members = np.flatnonzero(info.train.labels == klass.index)[:SAMPLES_PER_CLASS]
        for axes, index in zip(axes_row, list(members) + [None] * SAMPLES_PER_CLASS,
                               strict=False):
            axes.axis("off")
            if index is not None:
                _show(axes, info.train.absolute(int(index)))
        axes_row[0].set_title(klass.display_name, fontsize=8, loc="left")
    figure.tight_layout()
    _save_figure(figure, path)


def plot_duplicates(quality: QualityInfo, path: Path) -> None:
    groups = quality.duplicates[:DUPLICATE_ROWS]
    columns = min(SAMPLES_PER_CLASS, max(len(group.paths) for group in groups))
    figure, grid = _pyplot().subplots(len(groups), columns, figsize=(columns * 1.3,
                                                                     len(groups) * 1.4),
                                      squeeze=False)
    for group, axes_row in zip(groups, grid, strict=True):
        for axes, member in zip(axes_row, list(group.paths) + [None] * columns, strict=False):
            axes.axis("off")
            if member is not None:
                _show(axes, quality.root / member)
                axes.set_title(member.split("/", 1)[0], fontsize=7)
        axes_row[0].text(-0.1, 0.5, group.how, transform=axes_row[0].transAxes, rotation=90,
                         ha="right", va="center", fontsize=7)
    figure.tight_layout()
    _save_figure(figure, path)


def plot_quality_flags(quality: QualityInfo, path: Path) -> None:
    """A row of thumbnails per flag raised, the flag's measured value under each."""
    flagged = {flag: [row for row in quality.flagged if flag in row["flags"].split()]
               for flag in FLAGS}
    flags = [flag for flag in FLAGS if flagged[flag]]
    figure, grid = _pyplot().subplots(len(flags), SAMPLES_PER_CLASS,
                                      figsize=(SAMPLES_PER_CLASS * 1.3, len(flags) * 1.5),
                                      squeeze=False)
    for flag, axes_row in zip(flags, grid, strict=True):
        for axes, row in zip(axes_row, flagged[flag] + [None] * SAMPLES_PER_CLASS,
                             strict=False):
            axes.axis("off")
            if row is not None:
                _show(axes, quality.root / row["path"])
                axes.set_title(row["path"].split("/", 1)[0], fontsize=7)
        axes_row[0].text(-0.1, 0.5, flag, transform=axes_row[0].transAxes, rotation=90,
                         ha="right", va="center", fontsize=7)
    figure.tight_layout()
    _save_figure(figure, path)


def plot_gather(per_class: dict[str, Counter[str]], path: Path) -> None:
    outcomes = _outcome_order(per_class)
    totals: Counter[str] = Counter()
    for counts in per_class.values():
        totals.update(counts)
    figure, axes = _pyplot().subplots(figsize=(8, 3.5))
    axes.bar(outcomes, [totals[o] for o in outcomes],
             color=["tab:green" if o == "ok" else "tab:red" for o in outcomes])
    axes.set(ylabel="URLs", title=f"gather outcomes ({sum(totals.values())} URLs)")
    axes.tick_params(axis="x", rotation=45)
    figure.tight_layout()
    _save_figure(figure, path)


def _outcome_order(per_class: dict[str, Counter[str]]) -> list[str]:
    return sorted({o for c in per_class.values() for o in c}, key=lambda o: (o != "ok", o))


def _show(axes: Any, path: Path) -> None:
    try:
        axes.imshow(load_square(path, 64))
    except (ImageDecodeError, OSError):
        axes.text(0.5, 0.5, "unreadable", ha="center", fontsize=7)


def _save_figure(figure: Any, path: Path) -> None:
    with atomic_open(path) as handle:
        figure.savefig(handle, format="png", dpi=90)
    _pyplot().close(figure)


# -- HTML

def _figure(caption: str, path: Path, copy_as: str, out: Path) -> str:
    data = path.read_bytes()
    if copy_as:
        with atomic_open(out / copy_as) as handle:
            handle.write(data)
    encoded = base64.b64encode(data).decode("ascii")
    return (f"<figure><img src='data:image/png;base64,{encoded}' alt='{html.escape(caption)}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
                   for row in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _page(title: str, sections: list[str]) -> str:
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
             "padding:3px 8px;text-align:right}th{background:#f0f0f0}"
             "figure{margin:1em 0}img{max-width:100%}figcaption{color:#666;font-size:90%}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
            + "\n".join(sections) + "</body></html>\n")

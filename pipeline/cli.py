"""The `pipeline` command: parses options and calls the stage functions, nothing more.

Stages that do not train never import torch here, so `pipeline gather --help` starts fast.
Errors: bad input is one `error: ...` line and exit 2; any other failure is one line and
exit 1; tracebacks only with --verbose.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Any

import click

from pipeline import __version__
from pipeline.core import progress
from pipeline.core.errors import InputError
from pipeline.core.options import click_options, from_cli
from pipeline.core.parallel import default_workers
from pipeline.core.stage_options import (
    EvaluateOptions,
    ExportOptions,
    LabelOptions,
    MeanOptions,
    PackOptions,
    PredictOptions,
    ValidateOptions,
)
from pipeline.formats import runfolder
from pipeline.ml.archs import ARCHS
from pipeline.stages.finetune.options import FinetuneConfig
from pipeline.stages.gather.options import GatherOptions

log = logging.getLogger("pipeline")
FINETUNE = FinetuneConfig(train=Path("."))  # the defaults, for `pipeline layers --arch`

EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
WORKERS_OPTION = click.option("--workers", type=click.IntRange(min=1), default=default_workers,
                              show_default="all cores", help="Decoding processes.")

@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="pipeline")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging and full tracebacks.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors; no progress bars.")
def cli(verbose: bool, quiet: bool) -> None:
    """From ImageNet synset ids to a fine-tuned image classifier.

    \b
    The stages, in order (each reads the previous one's output):
      gather     download a synset's images from an ImageNet URL list
      validate   decode every image, quarantine the unreadable ones
      label      write train/val "path label" manifests and the label map
      mean       compute the mean image of the training set
      pack       pre-decode a manifest into an HDF5 file
      finetune   fine-tune a pretrained AlexNet/VGG with frozen lower layers
    Then: evaluate, predict and report on a checkpoint; export it for serving.

    Run `pipeline COMMAND --help` for a command's options.
    """
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s" if verbose
                        else "%(message)s")
    progress.ENABLED = not quiet


@cli.command()
@click.option("--wnid", "wnids", multiple=True, metavar="WNID",
              help="Synset to download, e.g. n02123045 (repeatable).")
@click.option("--wnids-file", type=EXISTING_FILE, help="File with one wnid per line.")
@click.option("--urls", required=True, type=click.Path(path_type=Path),
              help="ImageNet URL list (fall11_urls.txt style: '<wnid>_<num><TAB><url>').")
@click.option("--words", type=EXISTING_FILE, help="words.txt, for synset names in the summary.")
@click.option("--is-a", "is_a", type=EXISTING_FILE,
              help="wordnet.is_a.txt ('<parent> <child>' per line), for --with-hyponyms.")
@click.option("--with-hyponyms", is_flag=True,
              help="Also fetch every hyponym's images, filed under OUT/<wnid>/<hyponym>/ of "
                   "the most specific requested class that contains it.")
@click_options(GatherOptions)
def gather(wnids: tuple[str, ...], wnids_file: Path | None, urls: Path, words: Path | None,
           is_a: Path | None, with_hyponyms: bool, **options: Any) -> None:
    """Download the images of one or more synsets, in parallel, resumably.

    Every finished URL is journaled; running the same command again resumes: good images
    and final failures (404, not an image, ...) are not fetched again, transient ones
    (timeouts, unreachable or down hosts, 5xx, interrupted) are. Ctrl-C stops cleanly: URLs
    in flight get a few seconds, the rest are journaled as interrupted, the summary is
    printed (exit 130; 143 for SIGTERM).
    """
    from pipeline.formats.urllist import read_wnids_file, read_words
    from pipeline.stages.gather import gather_synsets

    requested = list(wnids) + (read_wnids_file(wnids_file) if wnids_file else [])
    report = gather_synsets(urls, requested, from_cli(GatherOptions, options), is_a=is_a,
                            with_hyponyms=with_hyponyms)
    click.echo(report.summary(read_words(words) if words else None))
    if report.interrupted_by:
        sys.exit(128 + report.interrupted_by)


@cli.command()
@click.argument("root", default=Path("data/raw"), type=click.Path(path_type=Path))
@click_options(ValidateOptions)
@WORKERS_OPTION
def validate(root: Path, **options: Any) -> None:
    """Fully decode every image under ROOT; move unreadable ones to quarantine.

    Nothing is deleted: each rejected file is moved to the quarantine folder under the same
    relative path, with a JSON line giving the reason. Unchanged files already validated are
    skipped on re-runs.
    """
    from pipeline.stages.validate import validate as run_validate

    click.echo(run_validate(root, from_cli(ValidateOptions, options,
                                           workers=options["workers"])).summary())


@cli.command()
@click.argument("root", default=Path("data/raw"), type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("manifests"), show_default=True, help="Folder for the manifests.")
@click.option("--words", type=EXISTING_FILE, help="words.txt, for human class names.")
@click_options(LabelOptions)
@WORKERS_OPTION
def label(root: Path, out: Path, words: Path | None, workers: int, **options: Any) -> None:
    """Write train/val manifests and the label map from ROOT's class folders.

    One class per top-level folder of ROOT (sorted); images in nested folders belong to their
    top-level class. Writes OUT/train.txt, OUT/val.txt ("path label" lines), OUT/labels.txt,
    OUT/root.txt, OUT/duplicates.txt and OUT/conflicts.txt. Copies of one image (identical
    bytes, or near-identical perceptual hashes) always land on the same side; hashes are
    cached in OUT/.label-cache.json (or --cache-dir) by path, size and mtime; nothing is
    written into ROOT.
    """
    from pipeline.formats.urllist import read_words
    from pipeline.stages.label import label as run_label

    report = run_label(root, out, words=read_words(words) if words else None, workers=workers,
                       **vars(from_cli(LabelOptions, options)))
    click.echo(report.summary())


@cli.command()
@click.argument("manifest", default=Path("manifests/train.txt"),
                type=click.Path(path_type=Path))
@click_options(MeanOptions)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("data/mean.npy"), show_default=True,
              help="The .npy; .png, .json and .images.txt are written beside it.")
@WORKERS_OPTION
def mean(manifest: Path, out: Path, workers: int, **options: Any) -> None:
    """Compute the mean image of MANIFEST's images (after training's resize/crop)."""
    from pipeline.stages.mean import compute_mean

    click.echo(compute_mean(manifest, out, workers=workers,
                            **vars(from_cli(MeanOptions, options))).summary())


@cli.command()
@click.argument("manifest", default=Path("manifests/train.txt"),
                type=click.Path(path_type=Path))
@click_options(PackOptions)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("data/train.h5"), show_default=True,
              help="The HDF5 file to write (with --shard-size, the shard set's index).")
@click.option("--shard-size", type=click.IntRange(min=1), metavar="N",
              help="Write shards of N manifest rows (OUT-00000.h5, ...) in parallel, plus OUT "
                   "as their index; an interrupted pack resumes at its unfinished shards.")
@WORKERS_OPTION
def pack(manifest: Path, out: Path, shard_size: int | None, workers: int,
         **options: Any) -> None:
    """Pre-decode MANIFEST's images into HDF5 (raw pixels or JPEG; one file or shards)."""
    from pipeline.stages.pack import pack as run_pack

    click.echo(run_pack(manifest, out, workers=workers, shard_size=shard_size,
                        **vars(from_cli(PackOptions, options))).summary())


@cli.command()
@click.option("--arch", type=click.Choice(ARCHS), default=FINETUNE.arch, show_default=True)
@click.option("--freeze-until", metavar="NAME", help="Mark the layers this would freeze.")
def layers(arch: str, freeze_until: str | None) -> None:
    """Print an architecture's layers under their classic names (conv1 ... fc8)."""
    from pipeline.core.tables import format_table
    from pipeline.ml.models import describe_layers

    click.echo(format_table(describe_layers(arch, freeze_until)))


@cli.command()
@click_options(FinetuneConfig)
def finetune(**options: Any) -> None:
    """Fine-tune a pretrained AlexNet/VGG with its lower layers frozen.

    Writes OUT/log.csv (a line per epoch), OUT/checkpoint.pt (see --checkpoint-every),
    OUT/best.pt, OUT/config.json and OUT/metrics.json. Works under `torchrun
    --nproc_per_node=N -m pipeline finetune ...` (DDP; gloo on CPU).
    """
    from pipeline.stages.finetune import finetune as run_finetune

    config = from_cli(FinetuneConfig, options)
    metrics = run_finetune(config)
    if metrics:
        click.echo(json.dumps(metrics, indent=2))


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Report folder.  [default: CHECKPOINT's folder/eval-DATA]")
@click_options(EvaluateOptions)
def evaluate(checkpoint: Path, data: Path, out: Path | None, **options: Any) -> None:
    """Top-1/top-5, per-class accuracy and confusion matrix of CHECKPOINT on DATA.

    DATA is a manifest or a packed .h5; preprocessing comes from the checkpoint.
    """
    from pipeline.stages.evaluate import evaluate_checkpoint

    out = out or runfolder.eval_folder(checkpoint.parent, data)
    click.echo(evaluate_checkpoint(checkpoint, data, out,
                                   **vars(from_cli(EvaluateOptions, options))).summary())


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click_options(PredictOptions)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a CSV (path, class/name/probability per rank, error) instead of "
                   "lines.  [default with a folder: predictions.csv]")
def predict(checkpoint: Path, images: tuple[Path, ...], out: Path | None,
            **options: Any) -> None:
    """Classify IMAGES (files, or folders of them) with CHECKPOINT: top-k classes.

    Files alone print a line each. A folder (every image under it), or --out, writes a CSV
    with progress; unreadable images are rows with an error there, not a failure. Images
    decode in --workers loader processes and run through the model in batches.
    """
    from pipeline.stages.evaluate import predict as run_predict
    from pipeline.stages.evaluate import predict_to_csv

    settings = vars(from_cli(PredictOptions, options))
    if out is not None or any(path.is_dir() for path in images):
        click.echo(predict_to_csv(checkpoint, list(images), out or Path("predictions.csv"),
                                  **settings).summary())
        return
    predictions = run_predict(checkpoint, list(images), **settings)
    for prediction in predictions:
        click.echo(prediction.summary())
    failed = sum(1 for prediction in predictions if prediction.error)
    if failed:
        raise InputError(f"{failed} of {len(images)} image(s) could not be read")


@cli.command()
@click.argument("manifests", default=Path("manifests"),
                type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", help="The dataset's name.  [default: imagenet-<N>-classes]")
@click.option("--description", help="What the dataset is.  [default: its classes and counts]")
@click.option("--license", "license_text",
              help="The license of the dataset.  [default: the images stay their owners'; "
                   "no license is granted]")
@click.option("--journal", type=EXISTING_FILE,
              help="gather's journal, for each image's source URL.  [default: "
                   "ROOT/gather.jsonl, ROOT from MANIFESTS/root.txt]")
@click.option("--validate-log", type=EXISTING_FILE,
              help="validate's log, for what it quarantined.  [default: ROOT/../validate.jsonl]")
def card(manifests: Path, name: str | None, description: str | None, license_text: str | None,
         journal: Path | None, validate_log: Path | None) -> None:
    """Write MANIFESTS/croissant.json: a Croissant 1.0 dataset card (MLCommons' JSON-LD, read
    by Hugging Face and Kaggle) of the dataset `pipeline label` wrote into MANIFESTS.

    Also writes MANIFESTS/images.csv, one row per image in the manifests: split, class,
    SHA-256, the URL it came from and when (gather's journal), quality flags. The card lists
    what each stage left out and why, and how the data was collected (robots.txt and TDMRep
    honoured).
    """
    from pipeline.stages.card import write_card

    click.echo(write_card(manifests, name=name, description=description,
                          **({"license_text": license_text} if license_text else {}),
                          journal=journal, validate_log=validate_log).summary())


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--compare", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="Another run to plot beside RUN_DIR, e.g. the from-scratch baseline "
                   "(repeatable).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for report.html and its PNGs.  [default: RUN_DIR]")
@click.option("--title", help="Page title.")
@click.option("--mean-image", type=EXISTING_FILE,
              help="The mean.png of `pipeline mean` to show.  [default: the run's --mean]")
def report(run_dir: Path, compare: tuple[Path, ...], out: Path | None, title: str | None,
           mean_image: Path | None) -> None:
    """Write RUN_DIR/report.html: curves, confusion matrix, mean image, samples, gather outcomes.

    Self-contained (images embedded); each figure is also saved as a PNG beside it.
    """
    from pipeline.stages.report import build_report

    page = build_report(run_dir, compare=list(compare), out=out, title=title,
                        mean_image=mean_image)
    click.echo(f"wrote {page}")


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click_options(ExportOptions)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The file to write, e.g. model.pt2, model.pt or model.onnx.")
def export(checkpoint: Path, out: Path, **options: Any) -> None:
    """Export CHECKPOINT for serving: uint8 N x H x W x 3 RGB in, class probabilities out.

    The checkpoint's resize, centre crop and normalization run inside the model; the label
    map rides in the file (key pipeline.json: an extra file of the torch.export or TorchScript
    archive, ONNX metadata).
    """
    from pipeline.stages.export import export as run_export

    settings = from_cli(ExportOptions, options)
    result = run_export(checkpoint, settings.fmt, out, size=settings.size)
    shape = result.metadata["input"]
    height = shape["height"] or "H"
    width = shape["width"] or "W"
    click.echo(f"wrote {result.path}: uint8 N x {height} x {width} x 3 RGB -> probabilities "
               f"of {len(result.metadata['classes'])} classes; labels in its pipeline.json")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: maps every failure to a one-line message and an exit code."""
    try:
        code = cli.main(args=argv, prog_name="pipeline", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else "pipeline"
        _fail(f"error: {exc.format_message()} (see '{where} --help')", exc.exit_code)
    except click.ClickException as exc:
        _fail(f"error: {exc.format_message()}", exc.exit_code)
    except InputError as exc:
        _fail(f"error: {exc}", 2)
    except KeyboardInterrupt:
        _fail("error: interrupted (re-run the same command to resume)", 130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, exit 1
        _fail(f"error: {type(exc).__name__}: {exc}", 1)
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, code: int) -> None:
    if log.isEnabledFor(logging.DEBUG):
        traceback.print_exc()
    click.echo(message, err=True)
    sys.exit(code)

"""The `pipeline` command: parses options and calls the stage functions, nothing more.

Stages that do not train never import torch here, so `pipeline gather --help` starts fast.
Errors: bad input is one `error: ...` line and exit 2; any other failure is one line and
exit 1; tracebacks only with --verbose.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import traceback
from pathlib import Path

import click

from pipeline import __version__
from pipeline.core import progress
from pipeline.core.errors import InputError
from pipeline.core.parallel import default_workers
from pipeline.core.stage_options import (
    CROSS_CLASS,
    ENCODINGS,
    EVALUATE,
    EXPORT_FORMATS,
    JPEG_QUALITY,
    LABEL,
    SIZE,
    VALIDATE,
)
from pipeline.formats import runfolder
from pipeline.ml.archs import ARCHS
from pipeline.stages.finetune.options import (
    CACHE_DTYPES,
    DECODE_DEVICES,
    PRECISIONS,
    SCHEDULES,
    FinetuneConfig,
)
from pipeline.stages.gather.options import HYPONYM_CONFLICTS, GatherOptions

log = logging.getLogger("pipeline")
GATHER = GatherOptions()  # the defaults, written once
FINETUNE = FinetuneConfig(train=Path("."))

EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
WORKERS_OPTION = click.option("--workers", type=click.IntRange(min=1), default=default_workers,
                              show_default="all cores", help="Decoding processes.")
SIZE_OPTION = click.option(
    "--size", type=click.IntRange(min=8), default=SIZE, show_default=True,
    help="Images are resized (shorter side) and center-cropped to SIZE x SIZE.")


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
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=GATHER.out, show_default=True,
              help="Output root: images go to OUT/<wnid>/, the journal to OUT/gather.jsonl.")
@click.option("--words", type=EXISTING_FILE, help="words.txt, for synset names in the summary.")
@click.option("--is-a", "is_a", type=EXISTING_FILE,
              help="wordnet.is_a.txt ('<parent> <child>' per line), for --with-hyponyms.")
@click.option("--with-hyponyms", is_flag=True,
              help="Also fetch every hyponym's images, filed under OUT/<wnid>/<hyponym>/ of "
                   "the most specific requested class that contains it.")
@click.option("--hyponym-conflicts", type=click.Choice(HYPONYM_CONFLICTS),
              default=GATHER.hyponym_conflicts, show_default=True,
              help="A hyponym under two unrelated requested classes (several parents): drop "
                   "its URLs, or file them under the first of those classes as requested. "
                   "Listed in OUT/hyponym_conflicts.txt either way.")
@click.option("--limit", type=click.IntRange(min=1),
              help="Stop at exactly this many good images per synset.")
@click.option("--concurrency", type=click.IntRange(min=1), default=GATHER.concurrency,
              show_default=True,
              help="Downloads in flight at once (over all processes); at most half of them "
                   "to hosts that have not answered yet.")
@click.option("--per-host", type=click.IntRange(min=1), default=GATHER.per_host,
              show_default=True, help="Connections to any one host at once.")
@click.option("--processes", type=click.IntRange(min=1), default=None,
              show_default="all cores, at most 8",
              help="Worker processes, each with its own event loop.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=GATHER.timeout,
              show_default=True, help="Seconds to connect, and to wait for each read.")
@click.option("--url-deadline", type=click.FloatRange(min=0.1), default=GATHER.url_deadline,
              show_default=True,
              help="Seconds one attempt may take in all (connect, redirects, whole body).")
@click.option("--min-rate", type=click.IntRange(min=0), default=GATHER.min_rate,
              show_default=True,
              help="Bytes/s a body must average once --timeout seconds have passed (0: off).")
@click.option("--retries", type=click.IntRange(min=0), default=GATHER.retries,
              show_default=True,
              help="Extra attempts in this run for failures that may heal at once (5xx, 429, "
                   "resets); connection failures and timeouts wait for the next run.")
@click.option("--host-failures", type=click.IntRange(min=1), default=GATHER.host_failures,
              show_default=True,
              help="Connection failures in a row (refused, no connection within --timeout, "
                   "TLS) that pause a host; one more try after --host-down-after seconds, and "
                   "if it fails too the host's other URLs are not requested in this run "
                   "(journaled host_down, tried next run).")
@click.option("--host-down-after", type=click.FloatRange(min=0), default=GATHER.host_down_after,
              show_default=True,
              help="Seconds a host's failures must span before it is given up for the run.")
@click.option("--resolve", "resolve", multiple=True, metavar="HOST:PORT:ADDR",
              help="Connect to ADDR for HOST (and PORT; HOST:ADDR for any port) without DNS, "
                   "as curl's --resolve (repeatable).")
@click.option("--dns-server", "dns_servers", multiple=True, metavar="ADDR[:PORT]",
              help="Ask this DNS resolver instead of the system's (repeatable; /etc/hosts and "
                   "--resolve still come first), e.g. for a node without a good local "
                   "resolver.")
@click.option("--dns-timeout", type=click.FloatRange(min=0.1), default=GATHER.dns_timeout,
              show_default=True,
              help="Seconds one name lookup may take. A name that does not exist is "
                   "host_not_found for all its URLs (tried again next run); a timeout is asked "
                   "again before it counts.")
@click.option("--allow-private-redirects", is_flag=True,
              help="Follow redirects from public addresses to loopback/private/link-local ones "
                   "(refused by default as blocked_redirect).")
@click.option("--max-bytes", type=click.IntRange(min=1024), default=GATHER.max_bytes,
              show_default=True, help="Larger bodies are dropped as too_large.")
@click.option("--min-size", type=click.IntRange(min=0), default=GATHER.min_size,
              show_default=True,
              help="Images whose shorter side is smaller are dropped as too_small.")
@click.option("--ignore-opt-out", is_flag=True,
              help="Keep images whose X-Robots-Tag says noai/noimageai (honoured by default).")
@click.option("--placeholder", "placeholders", multiple=True, type=EXISTING_FILE,
              help="An image a host serves for deleted photos; identical bytes are dropped "
                   "as placeholder (repeatable).")
@click.option("--placeholder-after", type=click.IntRange(min=0),
              default=GATHER.placeholder_after, show_default=True,
              help="The same image (same bytes, or a near-identical perceptual hash: resized "
                   "or re-encoded) from this many URLs (at least two different ones) is a "
                   "host's generic placeholder: every copy is dropped as placeholder and the "
                   "body remembered in OUT/placeholders.txt. A host that gives an image is "
                   "also asked once for a made-up path: the picture it serves there is its "
                   "placeholder (0: both off).")
def gather(wnids: tuple[str, ...], wnids_file: Path | None, urls: Path, out: Path,
           words: Path | None, is_a: Path | None, with_hyponyms: bool, hyponym_conflicts: str,
           limit: int | None,
           concurrency: int, per_host: int, processes: int | None, timeout: float,
           url_deadline: float, min_rate: int, retries: int, host_failures: int,
           host_down_after: float, resolve: tuple[str, ...], dns_servers: tuple[str, ...],
           dns_timeout: float, allow_private_redirects: bool, max_bytes: int,
           min_size: int, ignore_opt_out: bool, placeholders: tuple[Path, ...],
           placeholder_after: int) -> None:
    """Download the images of one or more synsets, in parallel, resumably.

    Every finished URL is journaled; running the same command again resumes: good images
    and final failures (404, not an image, ...) are not fetched again, transient ones
    (timeouts, unreachable or down hosts, 5xx, interrupted) are. Ctrl-C stops cleanly: URLs
    in flight get a few seconds, the rest are journaled as interrupted, the summary is
    printed (exit 130; 143 for SIGTERM).
    """
    from pipeline.formats.urllist import read_wnids_file, read_words
    from pipeline.stages import gather as stage
    from pipeline.stages.gather.names import parse_dns_server, parse_resolve

    requested = list(wnids) + (read_wnids_file(wnids_file) if wnids_file else [])
    options = GatherOptions(
        out=out, concurrency=concurrency, per_host=per_host, processes=processes or 0,
        timeout=timeout, url_deadline=url_deadline, min_rate=min_rate, retries=retries,
        host_failures=host_failures, host_down_after=host_down_after,
        resolve=tuple(parse_resolve(r) for r in resolve),
        dns_servers=tuple(parse_dns_server(d) for d in dns_servers), dns_timeout=dns_timeout,
        allow_private_redirects=allow_private_redirects, max_bytes=max_bytes,
        min_size=min_size, limit=limit, honour_opt_out=not ignore_opt_out,
        placeholder_digests=frozenset(hashlib.sha256(p.read_bytes()).hexdigest()
                                      for p in placeholders),
        placeholder_after=placeholder_after, hyponym_conflicts=hyponym_conflicts)
    report = stage.gather_synsets(urls, requested, options, is_a=is_a,
                                  with_hyponyms=with_hyponyms)
    click.echo(report.summary(read_words(words) if words else None))
    if report.interrupted_by:
        sys.exit(128 + report.interrupted_by)


@cli.command()
@click.argument("root", default=Path("data/raw"), type=click.Path(path_type=Path))
@click.option("--quarantine", type=click.Path(file_okay=False, path_type=Path),
              help="Where unreadable files are moved.  [default: ROOT/../rejected]")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path),
              help="JSON Lines log of every quarantined file.  [default: ROOT/../validate.jsonl]")
@click.option("--min-size", type=click.IntRange(min=0), default=VALIDATE.min_size,
              show_default=True,
              help="Images whose shorter side is smaller are quarantined as too_small.")
@WORKERS_OPTION
@click.option("--seconds-per-file", type=click.FloatRange(min=0.1),
              default=VALIDATE.seconds_per_file,
              show_default=True, help="A file that takes longer to decode is quarantined.")
def validate(root: Path, quarantine: Path | None, report: Path | None, min_size: int,
             workers: int, seconds_per_file: float) -> None:
    """Fully decode every image under ROOT; move unreadable ones to quarantine.

    Nothing is deleted: each rejected file is moved to the quarantine folder under the same
    relative path, with a JSON line giving the reason. Unchanged files already validated are
    skipped on re-runs.
    """
    from pipeline.stages import validate as stage

    options = stage.ValidateOptions(
        quarantine=quarantine or root.parent / "rejected",
        report=report or root.parent / "validate.jsonl",
        min_size=min_size, workers=workers, seconds_per_file=seconds_per_file)
    click.echo(stage.validate(root, options).summary())


@cli.command()
@click.argument("root", default=Path("data/raw"), type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("manifests"), show_default=True, help="Folder for the manifests.")
@click.option("--val-ratio", type=click.FloatRange(0.0, 1.0, max_open=True),
              default=LABEL.val_ratio, show_default=True,
              help="Share of each class held out for validation.")
@click.option("--seed", type=int, default=LABEL.seed, show_default=True,
              help="Seed of the split.")
@click.option("--words", type=EXISTING_FILE, help="words.txt, for human class names.")
@click.option("--near-distance", type=click.IntRange(0, 15), default=LABEL.near_distance,
              show_default=True,
              help="Images whose 64-bit perceptual hashes differ in at most this many bits "
                   "(and agree on a finer hash) are copies: re-encoded, rescaled, slightly "
                   "cropped or bordered (0: byte-identical files only).")
@click.option("--cross-class", type=click.Choice(CROSS_CLASS), default=LABEL.cross_class,
              show_default=True,
              help="Copies found in several classes: drop them all, keep those of the first "
                   "class (in label order), or keep every copy (on one side of the split). "
                   "Listed in OUT/conflicts.txt either way; nothing is deleted.")
@WORKERS_OPTION
def label(root: Path, out: Path, val_ratio: float, seed: int, words: Path | None,
          near_distance: int, cross_class: str, workers: int) -> None:
    """Write train/val manifests and the label map from ROOT's class folders.

    One class per top-level folder of ROOT (sorted); images in nested folders belong to their
    top-level class. Writes OUT/train.txt, OUT/val.txt ("path label" lines), OUT/labels.txt,
    OUT/root.txt, OUT/duplicates.txt and OUT/conflicts.txt. Copies of one image (identical
    bytes, or near-identical perceptual hashes) always land on the same side; hashes are
    cached in ROOT/.label-hashes.json by size and mtime.
    """
    from pipeline.formats.urllist import read_words
    from pipeline.stages.label import label as run_label

    report = run_label(root, out, val_ratio=val_ratio, seed=seed,
                       words=read_words(words) if words else None,
                       near_distance=near_distance, cross_class=cross_class, workers=workers)
    click.echo(report.summary())


@cli.command()
@click.argument("manifest", default=Path("manifests/train.txt"),
                type=click.Path(path_type=Path))
@SIZE_OPTION
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("data/mean.npy"), show_default=True,
              help="The .npy; .png, .json and .images.txt are written beside it.")
@WORKERS_OPTION
def mean(manifest: Path, size: int, out: Path, workers: int) -> None:
    """Compute the mean image of MANIFEST's images (after training's resize/crop)."""
    from pipeline.stages.mean import compute_mean

    click.echo(compute_mean(manifest, out, size=size, workers=workers).summary())


@cli.command()
@click.argument("manifest", default=Path("manifests/train.txt"),
                type=click.Path(path_type=Path))
@SIZE_OPTION
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("data/train.h5"), show_default=True,
              help="The HDF5 file to write (with --shard-size, the shard set's index).")
@click.option("--encoding", type=click.Choice(ENCODINGS), default=ENCODINGS[0],
              show_default=True, help="raw: uint8 pixels (fastest to read); jpeg: JPEG bytes "
                                      "at --quality (5-10x smaller, decoded by the loader).")
@click.option("--quality", type=click.IntRange(1, 100), default=JPEG_QUALITY, show_default=True,
              help="JPEG quality of --encoding jpeg.")
@click.option("--shard-size", type=click.IntRange(min=1), metavar="N",
              help="Write shards of N manifest rows (OUT-00000.h5, ...) in parallel, plus OUT "
                   "as their index; an interrupted pack resumes at its unfinished shards.")
@WORKERS_OPTION
def pack(manifest: Path, size: int, out: Path, encoding: str, quality: int,
         shard_size: int | None, workers: int) -> None:
    """Pre-decode MANIFEST's images into HDF5 (raw pixels or JPEG; one file or shards)."""
    from pipeline.stages.pack import pack as run_pack

    click.echo(run_pack(manifest, out, size=size, workers=workers, encoding=encoding,
                        quality=quality, shard_size=shard_size).summary())


@cli.command()
@click.option("--arch", type=click.Choice(ARCHS), default=FINETUNE.arch, show_default=True)
@click.option("--freeze-until", metavar="NAME", help="Mark the layers this would freeze.")
def layers(arch: str, freeze_until: str | None) -> None:
    """Print an architecture's layers under their classic names (conv1 ... fc8)."""
    from pipeline.core.tables import format_table
    from pipeline.ml.models import describe_layers

    click.echo(format_table(describe_layers(arch, freeze_until)))


@cli.command()
@click.option("--train", "train_data", required=True, type=click.Path(path_type=Path),
              help="Training data: a manifest (manifests/train.txt) or a packed .h5 file.")
@click.option("--val", "val_data", type=click.Path(path_type=Path),
              help="Validation data (manifest or .h5), evaluated after every epoch.")
@click.option("--arch", type=click.Choice(ARCHS), default=FINETUNE.arch, show_default=True)
@click.option("--weights", default=FINETUNE.weights, show_default=True,
              help="imagenet (torchvision's cache), none (from scratch), or a .pt/.pth file.")
@click.option("--freeze-until", default=FINETUNE.freeze_until, show_default=True, metavar="NAME",
              help="Freeze this layer and all before it (see `pipeline layers`); 'none' "
                   "trains everything.")
@click.option("--epochs", type=click.IntRange(min=1), default=FINETUNE.epochs, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=FINETUNE.batch_size,
              show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=FINETUNE.lr,
              show_default=True, help="Learning rate of the new fc8 (and of all layers with "
                                      "--weights none).")
@click.option("--lr-mult", type=click.FloatRange(min=0), default=FINETUNE.lr_mult,
              show_default=True,
              help="Pretrained unfrozen layers learn at LR x LR_MULT (Caffe's lr_mult).")
@click.option("--momentum", type=click.FloatRange(0, 1), default=FINETUNE.momentum,
              show_default=True)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=FINETUNE.weight_decay,
              show_default=True,
              help="L2 on weights (not biases).")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=FINETUNE.schedule,
              show_default=True, help="step: /10 every --step-epochs; plateau: /10 when "
                                      "validation top-1 stops improving (the VGG paper's rule).")
@click.option("--step-epochs", type=click.IntRange(min=1),
              help="Epochs between /10 steps.  [default: a third of --epochs]")
@click.option("--label-smoothing", type=click.FloatRange(0, 1, max_open=True),
              default=FINETUNE.label_smoothing,
              show_default=True)
@click.option("--crop", type=click.IntRange(min=8), default=FINETUNE.crop, show_default=True,
              help="Network input size.")
@click.option("--resize", type=click.IntRange(min=8), default=FINETUNE.resize, show_default=True,
              help="Shorter side before cropping.")
@click.option("--scale-jitter", nargs=2, type=click.IntRange(min=8), metavar="MIN MAX",
              help="Train with the shorter side drawn from [MIN, MAX] (VGG: 256 512).")
@click.option("--mean", default=FINETUNE.mean, show_default=True,
              help="Normalization: auto (the weights' own), imagenet, or a mean.npy from "
                   "`pipeline mean`.")
@click.option("--workers", type=click.IntRange(min=0), default=FINETUNE.workers,
              show_default=True, help="Loader processes.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=FINETUNE.out, show_default=True, help="Run folder.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.")
@click.option("--seed", type=int, default=FINETUNE.seed, show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default=FINETUNE.precision,
              show_default=True, help="bf16 autocast on CPU/GPU, fp16 (+grad scaling) on CUDA.")
@click.option("--channels-last/--no-channels-last", default=FINETUNE.channels_last,
              show_default=True,
              help="NHWC memory format (faster convolutions on CPUs with oneDNN and on "
                   "tensor-core GPUs).")
@click.option("--cache-features", is_flag=True,
              help="Compute the frozen layers' output once per image and view, store it, and "
                   "train the rest from it (much faster per epoch; see README).")
@click.option("--cache-views", type=click.IntRange(min=1), default=FINETUNE.cache_views,
              show_default=True,
              help="Augmented views cached per training image (view 0: the centre crop); each "
                   "epoch trains on one of them.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where caches live, shared by runs with the same key.  "
                   "[default: .feature-cache/ beside the training data]")
@click.option("--cache-dtype", type=click.Choice(CACHE_DTYPES), default=FINETUNE.cache_dtype,
              show_default=True, help="Storage type of cached features.")
@click.option("--tensorboard", type=click.Path(file_okay=False, path_type=Path),
              help="Also log every epoch's figures (those of log.csv) to TensorBoard in this "
                   "folder (needs the tensorboard package).")
@click.option("--decode-device", type=click.Choice(DECODE_DEVICES),
              default=FINETUNE.decode_device, show_default=True,
              help="Where JPEG packs (pack --encoding jpeg) are decoded: cpu (loader workers), "
                   "cuda (whole batches with nvJPEG, crops on the GPU), auto (cuda when "
                   "training on CUDA).")
@click.option("--max-steps", type=click.IntRange(min=1), hidden=True)
def finetune(train_data: Path, val_data: Path | None, arch: str, weights: str,
             freeze_until: str, epochs: int, batch_size: int, lr: float, lr_mult: float,
             momentum: float, weight_decay: float, schedule: str, step_epochs: int | None,
             label_smoothing: float, crop: int, resize: int,
             scale_jitter: tuple[int, int] | None, mean: str, workers: int, out: Path,
             resume: bool, seed: int, precision: str, channels_last: bool,
             cache_features: bool, cache_views: int, cache_dir: Path | None, cache_dtype: str,
             tensorboard: Path | None, decode_device: str, max_steps: int | None) -> None:
    """Fine-tune a pretrained AlexNet/VGG with its lower layers frozen.

    Writes OUT/log.csv (a line per epoch), OUT/checkpoint.pt (every epoch), OUT/best.pt,
    OUT/config.json and OUT/metrics.json. Works under `torchrun --nproc_per_node=N -m
    pipeline finetune ...` (DDP; gloo on CPU).
    """
    from pipeline.stages.finetune import finetune as run_finetune

    config = FinetuneConfig(
        train=train_data, val=val_data, arch=arch, weights=weights,
        freeze_until=None if freeze_until == "none" else freeze_until, epochs=epochs,
        batch_size=batch_size, lr=lr, lr_mult=lr_mult, momentum=momentum,
        weight_decay=weight_decay, schedule=schedule, step_epochs=step_epochs,
        label_smoothing=label_smoothing, crop=crop, resize=resize,
        jitter=tuple(scale_jitter) if scale_jitter else None, mean=mean, workers=workers,
        out=out, resume=resume, seed=seed, precision=precision, channels_last=channels_last,
        cache_features=cache_features, cache_views=cache_views, cache_dir=cache_dir,
        cache_dtype=cache_dtype, tensorboard=tensorboard, decode_device=decode_device,
        max_steps=max_steps)
    metrics = run_finetune(config)
    if metrics:
        click.echo(json.dumps(metrics, indent=2))


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Report folder.  [default: CHECKPOINT's folder/eval-DATA]")
@click.option("--batch-size", type=click.IntRange(min=1), default=EVALUATE.batch_size,
              show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=EVALUATE.workers,
              show_default=True)
def evaluate(checkpoint: Path, data: Path, out: Path | None, batch_size: int,
             workers: int) -> None:
    """Top-1/top-5, per-class accuracy and confusion matrix of CHECKPOINT on DATA.

    DATA is a manifest or a packed .h5; preprocessing comes from the checkpoint.
    """
    from pipeline.stages.evaluate import evaluate_checkpoint

    out = out or runfolder.eval_folder(checkpoint.parent, data)
    click.echo(evaluate_checkpoint(checkpoint, data, out, batch_size=batch_size,
                                   workers=workers).summary())


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top-k", type=click.IntRange(min=1), default=EVALUATE.top_k, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a CSV (path, class/name/probability per rank, error) instead of "
                   "lines.  [default with a folder: predictions.csv]")
def predict(checkpoint: Path, images: tuple[Path, ...], top_k: int, out: Path | None) -> None:
    """Classify IMAGES (files, or folders of them) with CHECKPOINT: top-k classes.

    Files alone print a line each. A folder (every image under it), or --out, writes a CSV
    with progress; unreadable images are rows with an error there, not a failure.
    """
    from pipeline.stages.evaluate import predict as run_predict
    from pipeline.stages.evaluate import predict_to_csv

    if out is not None or any(path.is_dir() for path in images):
        click.echo(predict_to_csv(checkpoint, list(images), out or Path("predictions.csv"),
                                  top_k).summary())
        return
    predictions = run_predict(checkpoint, list(images), top_k)
    for prediction in predictions:
        click.echo(prediction.summary())
    failed = sum(1 for prediction in predictions if prediction.error)
    if failed:
        raise InputError(f"{failed} of {len(images)} image(s) could not be read")


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
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), required=True,
              help="TorchScript (torch.jit.load, any image size) or ONNX (onnxruntime, a "
                   "fixed size; needs the onnx extra).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The file to write, e.g. model.pt or model.onnx.")
@click.option("--size", type=click.IntRange(min=8),
              help="ONNX only: the input height and width.  [default: the checkpoint's "
                   "resize, the size `pipeline pack` wrote]")
def export(checkpoint: Path, fmt: str, out: Path, size: int | None) -> None:
    """Export CHECKPOINT for serving: uint8 N x H x W x 3 RGB in, class probabilities out.

    The checkpoint's resize, centre crop and normalization run inside the model; the label
    map rides in the file (key pipeline.json: TorchScript extra file, ONNX metadata).
    """
    from pipeline.stages.export import export as run_export

    result = run_export(checkpoint, fmt, out, size=size)
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

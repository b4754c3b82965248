"""The run folder's layout: the files `pipeline finetune` writes, `pipeline evaluate`'s default
folder inside it, and the files that folder holds.

One home for these names because several parts read what another wrote: `finetune` writes the
run, `evaluate` reads `best.pt` and writes beside it, `report` and the benchmarks read both
(the Makefile spells the same names; docs/FORMATS.md documents them). Stdlib only, so the CLI's
`--help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

# Written by `pipeline finetune`.
CONFIG = "config.json"  # the options the run was started with
LOG = "log.csv"  # a line per epoch
CHECKPOINT = "checkpoint.pt"  # the latest epoch's, for --resume
BEST = "best.pt"  # a hard link to the best epoch's checkpoint
METRICS = "metrics.json"  # written last: the run finished

# Written by `pipeline evaluate` into its folder.
EVAL_JSON = "eval.json"
PER_CLASS_CSV = "per_class.csv"
CONFUSION_CSV = "confusion.csv"
CONFUSION_PNG = "confusion.png"
MISCLASSIFIED_CSV = "misclassified.csv"
MISCLASSIFIED_PNG = "misclassified.png"


def eval_folder(run: Path, data: Path | str) -> Path:
    """`pipeline evaluate`'s default folder for DATA (a manifest or pack): `eval-<its stem>`
    in the run folder, where `report` looks for it."""
    return Path(run) / f"eval-{Path(data).stem}"

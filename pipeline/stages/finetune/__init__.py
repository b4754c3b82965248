"""`pipeline finetune`: fine-tune a pretrained AlexNet/VGG with its lower layers frozen.

`options` holds the settings and the checks that need no model (torch-free, so `--help` is
fast); `optim` the parameter groups and schedules; `loop` one epoch as a free function;
`distributed` the ranks under torchrun; `saver` the run folder (log, checkpoints and best.pt
written, and read back by --resume); `cache` the frozen-trunk feature cache; `run` reads top
to bottom: data, model, optimizer, resume, epochs.
"""

from __future__ import annotations

from typing import Any

from pipeline.stages.finetune.options import FinetuneConfig

__all__ = ["FinetuneConfig", "finetune"]


def __getattr__(name: str) -> Any:
    """`finetune` loads torch: only on use, so `pipeline --help` stays fast."""
    if name == "finetune":
        from pipeline.stages.finetune.run import finetune
        return finetune
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""pipeline: from ImageNet synset ids to a fine-tuned image classifier.

The Python API is the command line's own functions and options objects, e.g.

    from pipeline import GatherOptions, gather_synsets
    report = gather_synsets(Path("fall11_urls.txt"), ["n02123045"], GatherOptions(timeout=5))

is `pipeline gather --urls fall11_urls.txt --wnid n02123045 --timeout 5`. Names are imported
when first used, so `import pipeline` loads neither torch nor numpy.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> the module that defines it; docs/ARCHITECTURE.md lists the layers.
_EXPORTS = {
    "gather_synsets": "pipeline.stages.gather",
    "GatherOptions": "pipeline.stages.gather.options",
    "validate": "pipeline.stages.validate",
    "ValidateOptions": "pipeline.core.stage_options",
    "label": "pipeline.stages.label",
    "LabelOptions": "pipeline.core.stage_options",
    "compute_mean": "pipeline.stages.mean",
    "pack": "pipeline.stages.pack",
    "finetune": "pipeline.stages.finetune",
    "FinetuneConfig": "pipeline.stages.finetune.options",
    "evaluate_checkpoint": "pipeline.stages.evaluate",
    "EvaluateOptions": "pipeline.core.stage_options",
    "predict": "pipeline.stages.evaluate",
    "predict_to_csv": "pipeline.stages.evaluate",
    "PredictOptions": "pipeline.core.stage_options",
    "export": "pipeline.stages.export",
    "build_report": "pipeline.stages.report",
    "write_card": "pipeline.stages.card",
    "InputError": "pipeline.core.errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

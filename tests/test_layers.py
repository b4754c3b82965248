"""The layering, enforced: helpers -> formats -> shared ML pieces -> stages -> cli.

A module may import from its own layer or the layers below; a stage never imports another
stage (a stage's own package modules are one stage). Every module must be placed here, so a
new one is put in a layer on purpose.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pipeline"

LAYERS = {
    "helpers": {"__init__", "allocator", "archs", "errors", "fsutil", "images", "normalization",
                "parallel", "perceptual", "preprocess", "progress", "stage_options", "tables"},
    "formats": {"checkpoint", "journal", "manifest", "packfile", "runfolder", "urllist"},
    "shared": {"data", "metrics", "models"},
    "stages": {"evaluate", "export", "finetune", "gather", "label", "mean", "pack", "report",
               "validate"},
    "cli": {"__main__", "cli"},
}
ORDER = list(LAYERS)
LAYER_OF = {name: layer for layer, names in LAYERS.items() for name in names}


def component(path: Path) -> str:
    """The top-level unit a file belongs to: `pipeline/gather/run.py` -> `gather`."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def imported_components(path: Path) -> set[str]:
    """Every `pipeline.X` this file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            if node.module != "pipeline":
                names = names[:1]
        else:
            continue
        found |= {name.split(".")[1] for name in names
                  if name.startswith("pipeline.") and name.count(".") >= 1}
    return found


def violations() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = component(path)
        layer = LAYER_OF.get(source)
        where = path.relative_to(PACKAGE.parent)
        if layer is None:
            problems.append(f"{where}: module {source!r} is in no layer of tests/test_layers.py")
            continue
        for target in sorted(imported_components(path) - {source}):
            target_layer = LAYER_OF.get(target)
            if target_layer is None:
                continue  # reported as its own file
            if ORDER.index(target_layer) > ORDER.index(layer):
                problems.append(f"{where}: {source!r} ({layer}) imports {target!r} from the "
                                f"higher layer {target_layer!r}")
            elif layer == target_layer == "stages":
                problems.append(f"{where}: stage {source!r} imports stage {target!r} "
                                "(stages never import each other; move the shared piece down)")
    return problems


def test_every_import_respects_the_layers():
    problems = violations()
    assert not problems, "\n".join(problems)


def test_the_rule_sees_imports_inside_functions(tmp_path):
    code = "def f():\n    from pipeline.evaluate import predict\n    import pipeline.gather\n"
    probe = tmp_path / "probe.py"
    probe.write_text(code)
    assert imported_components(probe) == {"evaluate", "gather"}

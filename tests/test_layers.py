"""The layering, enforced on folders: core -> formats -> ml -> stages -> the command line.

A module may import from its own layer or the layers below; a stage never imports another
stage (a stage's own package modules are one stage). Every module lives in a layer's folder
(or is one of the few top-level modules named here), so a new one is put in a layer on purpose.
"""

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pipeline"

ORDER = ["core", "formats", "ml", "stages", "cli", "testing"]
# Top-level modules and their layer: the package's front door and the command line.
TOP_LEVEL = {"__init__": "cli", "__main__": "cli", "cli": "cli", "api": "cli"}


def unit_of(path: Path) -> tuple[str, str] | None:
    """(layer, unit) of a file: `pipeline/stages/gather/run.py` -> ("stages", "gather");
    `pipeline/core/fsutil.py` -> ("core", "fsutil"); None for a file in no layer."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if len(parts) == 1:
        layer = TOP_LEVEL.get(parts[0])
        return (layer, parts[0]) if layer else None
    if parts[0] not in ORDER:
        return None
    unit = parts[1] if len(parts) > 2 or parts[1] != "__init__" else parts[0]
    return parts[0], unit


def imported_modules(path: Path) -> set[str]:
    """Every `pipeline...` module this file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name == "pipeline" or name.startswith("pipeline.")}


def target_of(module: str) -> tuple[str, str] | None:
    """(layer, unit) a dotted import lands in: `pipeline.formats.journal.JOURNAL_NAME` ->
    ("formats", "journal"); `pipeline.__version__` is the front door's."""
    parts = module.split(".")[1:]
    if not parts or parts[0] not in ORDER:
        return ("cli", parts[0]) if parts and parts[0] in TOP_LEVEL else None
    return parts[0], parts[1] if len(parts) > 1 else parts[0]


def violations() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        where = path.relative_to(PACKAGE.parent)
        unit = unit_of(path)
        if unit is None:
            problems.append(f"{where}: in no layer folder ({', '.join(ORDER[:4])}) and not a "
                            "top-level module of tests/test_layers.py")
            continue
        layer, name = unit
        targets = {target_of(module): module for module in sorted(imported_modules(path),
                                                                  reverse=True)}
        for target, module in sorted(targets.items(), key=lambda item: item[1]):
            if target is None or target == unit:
                continue
            target_layer, target_name = target
            if ORDER.index(target_layer) > ORDER.index(layer) and target_name != "__version__":
                problems.append(f"{where}: {layer}/{name} imports {module} from the higher "
                                f"layer {target_layer!r}")
            elif layer == target_layer == "stages" and target_name != "stages":
                problems.append(f"{where}: stage {name!r} imports stage {target_name!r} "
                                "(stages never import each other; move the shared piece down)")
    return problems


def test_every_import_respects_the_layers():
    problems = violations()
    assert not problems, "\n".join(problems)


def test_the_rule_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from pipeline.stages.evaluate import predict\n"
                     "    import pipeline.stages.gather\n")
    assert target_of("pipeline.stages.evaluate.predict") == ("stages", "evaluate")
    assert {target_of(m) for m in imported_modules(probe)} == {
        ("stages", "evaluate"), ("stages", "gather")}


def test_the_rule_catches_an_arrow_up_and_a_stage_importing_a_stage(tmp_path, monkeypatch):
    fake = tmp_path / "pipeline"
    (fake / "core").mkdir(parents=True)
    (fake / "stages" / "gather").mkdir(parents=True)
    (fake / "core" / "fsutil.py").write_text("from pipeline.ml.models import build\n")
    (fake / "stages" / "gather" / "run.py").write_text("from pipeline.stages import label\n"
                                                       "import pipeline.stages.mean\n")
    (fake / "stages" / "label.py").write_text("from pipeline.core.fsutil import atomic_open\n")
    (fake / "stray.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    problems = violations()
    assert any("core/fsutil imports pipeline.ml.models" in p for p in problems), problems
    assert any("stage 'gather' imports stage 'label'" in p for p in problems), problems
    assert any("stage 'gather' imports stage 'mean'" in p for p in problems), problems
    assert any("stray.py: in no layer folder" in p for p in problems), problems
    assert len(problems) == 4, problems

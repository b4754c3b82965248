"""`pipeline validate`: fully decode every file; move the unusable ones to quarantine.

This is what stops one unreadable JPEG from killing hours of training. Files are moved, never
deleted, each with a JSON line saying why; files already validated and unchanged (same size
and mtime) are not decoded again, so re-running is cheap.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.errors import InputError
from pipeline.core.fsutil import JsonLinesWriter, atomic_write_text
from pipeline.core.images import ImageDecodeError, decode_image
from pipeline.core.parallel import imap
from pipeline.core.progress import Progress
from pipeline.core.stage_options import ValidateOptions
from pipeline.core.tables import format_table

log = logging.getLogger(__name__)

STATE_NAME = ".validated.json"


@dataclass
class ValidateReport:
    seen: Counter[str] = field(default_factory=Counter)
    kept: Counter[str] = field(default_factory=Counter)
    skipped: int = 0
    rejected: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))

    @property
    def total_rejected(self) -> int:
        return sum(sum(c.values()) for c in self.rejected.values())

    def summary(self) -> str:
        reasons = sorted({r for c in self.rejected.values() for r in c})
        header = ["class", "seen", "kept", "rejected", *reasons]
        rows = [header]
        for klass in sorted(self.seen):
            rejected = self.rejected.get(klass, Counter())
            rows.append([klass, str(self.seen[klass]), str(self.kept[klass]),
                         str(sum(rejected.values())), *(str(rejected[r]) for r in reasons)])
        lines = [format_table(rows)]
        seen, kept = sum(self.seen.values()), sum(self.kept.values())
        lines.append(f"{seen} file(s) seen = {kept} kept + {self.total_rejected} quarantined; "
                     f"{self.skipped} unchanged since the last run (not decoded again)")
        return "\n".join(lines)


def validate(root: Path, options: ValidateOptions) -> ValidateReport:
    """Check every file under the class folders of `root`; quarantine the failures."""
    if not root.is_dir():
        raise InputError(f"{root} is not a folder (pass the folder `pipeline gather` wrote)")
    state_path = root / STATE_NAME
    known = _read_state(state_path)
    report = ValidateReport()
    files = list(_class_files(root))
    todo = []
    for relative in files:
        report.seen[_class_of(relative)] += 1
        if known.get(relative) == _signature(root / relative):
            report.kept[_class_of(relative)] += 1
            report.skipped += 1
        else:
            todo.append(relative)
    present = set(files)
    good = {rel: sig for rel, sig in known.items() if rel in present}
    progress = Progress("validate", total=len(todo))
    jobs = ((root / rel, options.min_size, options.seconds_per_file) for rel in todo)
    with JsonLinesWriter(options.report_of(root)) as journal:
        for relative, problem in zip(todo, imap(_check_file, jobs, options.workers), strict=True):
            klass = _class_of(relative)
            if problem is None:
                report.kept[klass] += 1
                good[relative] = _signature(root / relative)
                progress.update(count="ok")
                continue
            reason, detail = problem
            destination = _quarantine(root / relative, options.quarantine_of(root) / relative)
            journal.write({"path": relative, "quarantined_to": str(destination),
                           "reason": reason, "detail": detail, "time": round(time.time(), 3)})
            report.rejected[klass][reason] += 1
            good.pop(relative, None)
            progress.update(count="rejected")
    progress.close()
    atomic_write_text(state_path, json.dumps(good, sort_keys=True))
    return report


def _class_files(root: Path) -> Iterator[str]:
    """Every non-hidden file inside the class folders (files at the root are not data)."""
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if not name.startswith("."):
                    yield Path(dirpath, name).relative_to(root).as_posix()


def _class_of(relative: str) -> str:
    return relative.split("/", 1)[0]


def _signature(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _read_state(path: Path) -> dict[str, list[int]]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return {}


class _FileTimeout(Exception):
    pass


def _on_alarm(signum: int, frame: object) -> None:
    raise _FileTimeout


def _check_file(job: tuple[Path, int, float]) -> tuple[str, str] | None:
    """(reason, detail) when the file is unusable, None when it decodes fully.

    Runs in a worker process; SIGALRM bounds the time spent on any one file.
    """
    path, min_size, seconds = job
    if path.stat().st_size == 0:
        return ("empty", "zero-byte file")
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        decode_image(path, min_size=min_size)
    except ImageDecodeError as problem:
        return (problem.reason, problem.detail)
    except _FileTimeout:
        return ("timeout", f"decoding took longer than {seconds:g} s")
    except MemoryError:
        return ("bomb", "ran out of memory while decoding")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return None


def _quarantine(source: Path, destination: Path) -> Path:
    """Move, never delete; an earlier quarantined file of the same name is kept too."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    candidate, n = destination, 1
    while candidate.exists():
        candidate = destination.with_name(f"{destination.name}.{n}")
        n += 1
    os.replace(source, candidate)
    return candidate

"""Measuring whole commands for the benchmark scripts: time, CPU, memory and machine noise.

The benchmarks compare whole commands (interpreter start-up included), so each one runs as a
subprocess and is measured from outside:

- "max RSS": the kernel's exact peak RSS of the largest single process of the command (wait4 in
  a tiny launcher, see LAUNCHER);
- "peak PSS": the largest summed proportional set size of the command's whole process tree
  (pool or DataLoader workers included, shared pages counted once), sampled every 50 ms;
- "other load": the share of all cores that other processes took meanwhile. The box is shared
  (CI and other sessions run on the same 2 cores) and a stranger's busy process halves a
  parallel speed-up, so figures from a disturbed run must say so.

Used as `import benchlib` from the benchmarks beside it (a script's own folder is on sys.path).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SAMPLE_SECONDS = 0.05

# A tiny launcher between us and the measured command. wait4's ru_maxrss is the peak over the
# pre-exec image too, and a child spawned straight from a benchmark script (numpy, PIL or torch
# loaded, 45 MB and more) would report at least that much; the launcher's own image (python -S,
# ~10 MB) is smaller than any command measured, so its figure is exact. It also times
# spawn-to-exit itself.
LAUNCHER = """
import json, os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    json.dump({"seconds": time.perf_counter() - start, "maxrss_kb": usage.ru_maxrss,
               "cpu": usage.ru_utime + usage.ru_stime,
               "code": os.waitstatus_to_exitcode(status)}, out)
"""


# --------------------------------------------------------------------------- memory

def process_tree(root_pid: int) -> list[int]:
    """root_pid and all its descendants, from /proc/*/stat parent ids.

    This kernel has no /proc/PID/task/TID/children, so the tree is rebuilt from every process.
    """
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                ppid = int(handle.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    tree, frontier = [], [root_pid]
    while frontier:
        pid = frontier.pop()
        tree.append(pid)
        frontier.extend(children.get(pid, []))
    return tree


def pss_kb(pid: int) -> int:
    """Proportional set size: pages forked workers share with their parent are split, not
    counted twice (0 once the process is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as handle:
            for line in handle:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeSampler(threading.Thread):
    """Samples the peak summed PSS of the process tree below `pid` (the launcher itself left out).

    The RSS of one process would miss the workers; summed RSS would count their shared pages
    twice.
    """

    def __init__(self, pid: int, every: float = SAMPLE_SECONDS) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.every = every
        self.peak_kb = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            total = sum(pss_kb(pid) for pid in process_tree(self.pid) if pid != self.pid)
            self.peak_kb = max(self.peak_kb, total)
            self._stop_event.wait(self.every)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


# --------------------------------------------------------------------------- CPU and noise

def cpu_seconds_of(pid: int) -> float:
    """User + system CPU of a live process (e.g. a local server the command talks to)."""
    with open(f"/proc/{pid}/stat", "rb") as handle:
        fields = handle.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def busy_seconds() -> float:
    """CPU time spent by everything on this machine (from /proc/stat), to detect noise."""
    with open("/proc/stat", "rb") as handle:
        fields = [int(v) for v in handle.readline().split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds(helper_pid: int | None = None) -> float:
    """This script, every child it has waited for (launchers and below) and a live helper.

    Subtracted from the machine's busy time, what is left is other people's load.
    """
    total = cpu_seconds_of(helper_pid) if helper_pid else 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


class OtherLoad:
    """Share of all cores that processes other than ours used from creation to `share()`."""

    def __init__(self, helper_pid: int | None = None) -> None:
        self.helper_pid = helper_pid
        self.busy = busy_seconds()
        self.own = own_cpu_seconds(helper_pid)

    def share(self, seconds: float) -> float:
        foreign = (busy_seconds() - self.busy) - (own_cpu_seconds(self.helper_pid) - self.own)
        return max(foreign, 0.0) / (seconds * (os.cpu_count() or 1))


@dataclass(frozen=True)
class Quiet:
    """How long to wait for the shared box to calm down before each timed command."""

    max_other: float = 0.10  # share of all cores other processes may use
    max_wait: float = 120.0  # seconds; then run anyway (and report the load)
    window: float = 1.0  # seconds over which the load is measured


def add_quiet_arguments(parser: argparse.ArgumentParser, *,
                        wait: float = Quiet.max_wait) -> None:
    """The quiet-machine options every benchmark takes (read back with `quiet_from`)."""
    parser.add_argument("--max-other-load", type=float, default=Quiet.max_other,
                        help="a timed command during which other processes used more than "
                             f"this share of the cores is discarded ({Quiet.max_other:g})")
    parser.add_argument("--quiet-wait", type=float, default=wait,
                        help=f"longest wait for quiet before a timed command, s ({wait:g})")


def quiet_from(args: argparse.Namespace, *, window: float = Quiet.window) -> Quiet:
    return Quiet(args.max_other_load, args.quiet_wait, window)


def wait_for_quiet(quiet: Quiet, helper_pid: int | None = None) -> float:
    """Block until other processes use at most `max_other` of the cores, or time runs out.

    Returns the share they used in the last window.
    """
    deadline = time.monotonic() + quiet.max_wait
    while True:
        load = OtherLoad(helper_pid)
        time.sleep(quiet.window)
        share = load.share(quiet.window)
        if share <= quiet.max_other or time.monotonic() > deadline:
            return share


def disturbed_warning(worst: float, max_other: float) -> str | None:
    """The warning to print when some run shared the machine with more than `max_other`."""
    if worst <= max_other:
        return None
    return (f"WARNING: other processes took up to {worst:.0%} of the cores during some runs "
            "(column 'other load'); those figures are disturbed, re-run on a quiet machine")


# --------------------------------------------------------------------------- one command

@dataclass
class Run:
    """The figures of one whole command."""

    seconds: float  # spawn to exit, timed by the launcher
    cpu_seconds: float  # user + system of the command's tree
    max_rss_mb: float  # exact, the largest single process
    peak_pss_mb: float  # sampled, the whole tree
    other_load: float  # share of all cores other processes used meanwhile
    helper_cpu_seconds: float = 0.0  # CPU the helper process (helper_pid) used meanwhile


class CommandTimeout(Exception):
    """A measured command ran past its time limit; its whole process group was killed."""

    def __init__(self, argv: list[str], limit: float) -> None:
        super().__init__(f"did not finish within {limit:g} s (killed): {' '.join(argv)}")
        self.argv = argv
        self.limit = limit


KILL_GRACE_SECONDS = 10.0


def kill_group(process: subprocess.Popen[bytes], grace: float = KILL_GRACE_SECONDS) -> None:
    """SIGTERM the process group that `process` leads (started with start_new_session), then
    SIGKILL whatever is left of it after `grace` seconds; `process` itself is reaped."""
    pgid = process.pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        process.poll()  # reap the leader: a zombie still counts as a member of its group
        try:
            os.killpg(pgid, 0)  # anybody left in the group?
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    process.wait()


def run_measured(argv: list[str], log: Path, *, cwd: Path | None = None,
                 env: dict[str, str] | None = None, append: bool = False,
                 helper_pid: int | None = None, sample_seconds: float = SAMPLE_SECONDS,
                 timeout: float | None = None) -> Run:
    """Run `argv` through LAUNCHER, its output into `log`, and measure it; exit on failure.

    `helper_pid` is a live process of ours the command talks to (a local server): its CPU is not
    counted as other load, and is reported on its own. The launcher's figures go to a file next
    to `log` (`*.figures.json`). Reading a process's PSS walks its page tables under its
    memory-map lock: for a process of gigabytes (training), sample rarely (`sample_seconds`)
    or the sampling itself slows the command down (by a third at 50 ms, measured).

    With `timeout` (seconds), the command runs in a process group of its own; past the limit
    (or on Ctrl-C) the whole group, worker processes included, is killed, and CommandTimeout
    is raised (KeyboardInterrupt re-raised).
    """
    figures = log.with_suffix(".figures.json")
    figures.unlink(missing_ok=True)
    helper_cpu = cpu_seconds_of(helper_pid) if helper_pid else 0.0
    load = OtherLoad(helper_pid)
    wall = time.perf_counter()
    with open(log, "ab" if append else "wb") as output:
        output.write(f"$ {' '.join(argv)}\n".encode())
        output.flush()
        launcher = subprocess.Popen([sys.executable, "-S", "-c", LAUNCHER, str(figures), *argv],
                                    cwd=cwd, stdout=output, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=timeout is not None)
        sampler = TreeSampler(launcher.pid, sample_seconds)
        sampler.start()
        try:
            launcher.wait(timeout=timeout)
        except BaseException as exc:  # the time limit, or Ctrl-C
            if timeout is None:
                raise
            kill_group(launcher)
            if isinstance(exc, subprocess.TimeoutExpired):
                raise CommandTimeout(argv, timeout) from None
            raise
        finally:
            sampler.stop()
    wall = time.perf_counter() - wall
    other_load = load.share(wall)
    result = json.loads(figures.read_text()) if launcher.returncode == 0 else {"code": -1}
    if result["code"] != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        sys.exit(f"command failed ({result['code']}): {' '.join(argv)}\n" + "\n".join(tail))
    helper_cpu = cpu_seconds_of(helper_pid) - helper_cpu if helper_pid else 0.0
    return Run(result["seconds"], result["cpu"], result["maxrss_kb"] / 1024,
               sampler.peak_kb / 1024, other_load, helper_cpu)


# --------------------------------------------------------------------------- reporting

def format_table(rows: list[list[str]], left: int = 1) -> str:
    """Columns padded to their widest cell; the first `left` columns left-aligned, the rest right.

    pipeline.core.tables.format_table is this with left=1; bench_prepare's table has two label
    columns (stage, impl).
    """
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) if i < left else cell.rjust(width)
                  for i, (cell, width) in enumerate(zip(row, widths, strict=True))).rstrip()
        for row in rows)

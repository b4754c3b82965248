#!/usr/bin/env python3
"""Peak memory of `pipeline gather` at ImageNet-1k scale: 1.4 million selected URLs, resume
included (issue 13: at most 300 MB).

Builds a synthetic `fall11_urls.txt`-style list of `--synsets` x `--per-synset` lines (10,000 x
1,400 = 14 million, ~0.7 GB, streamed to a temp folder), selects every 10th synset (1,000 wnids,
1.4 million URLs) and runs `pipeline gather` with its default options (`--processes 2`) on it.
Every URL points at a closed port on one of `--hosts` loopback addresses (127.1.x.y), so each
connection is refused at once and nothing is downloaded: what is measured is the bookkeeping of
1.4 million URLs (selection, journal, scheduler queues), not the network. The URLs are shaped
like the real list's: 60% on four "Flickr farm" hosts, the rest spread log-uniformly over the
other hosts (a few big, many small), ~250 hosts per synset. Host health gives each host its
probe (--host-failures attempts, refused) and journals the rest of its URLs `host_down`, as on the
real web's dead hosts, so the scheduler still walks every URL. Then the same command again: the
resume, which reads the 1.4-million-line journal and tries every (transient) URL again.

Memory is sampled every 0.1 s over the whole process tree (the coordinator and its workers):
"tree RSS" sums their resident sets (shared library pages counted once per process: the
strictest figure), "tree PSS" splits shared pages; "coordinator HWM" is the kernel's own peak
RSS of the coordinating process (VmHWM).

    python scripts/bench_gather_memory.py [--synsets 10000] [--per-synset 1400] [--every 10]
                                          [--hosts 4096] [--workdir /tmp] [--target-mb 300]

Needs ~2 GB of disk in the work folder (list, journal after two runs); all of it is removed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))

from benchlib import process_tree, pss_kb  # noqa: E402

SAMPLE_SECONDS = 0.1
FARMS = 4  # the "Flickr" hosts, 127.1.0.1..4
FARM_SHARE = 0.6
RUN_TIMEOUT = 3600.0


def wnid(index: int) -> str:
    return f"n{10_000_000 + index:08d}"


def host(key: int, hosts: int) -> str:
    """Deterministic, Flickr-heavy and long-tailed: 60% on FARMS hosts, the rest log-uniform."""
    mixed = (key * 2654435761) & 0xFFFFFFFF
    if mixed < FARM_SHARE * 2**32:
        number = 1 + mixed % FARMS
    else:
        share = ((key * 40503) & 0xFFFF) / 0x10000
        number = FARMS + int((hosts - FARMS) ** share)
    return f"127.1.{number >> 8}.{number & 0xFF}"


def write_list(path: Path, synsets: int, per_synset: int, every: int, hosts: int,
               port: int) -> list[str]:
    """The list, streamed; the wnids to select (every `every`th synset). Only selected
    synsets get varied hosts: the others are never read past their key."""
    selected = []
    with open(path, "w", encoding="ascii") as handle:
        for index in range(synsets):
            name = wnid(index)
            if index % every:
                handle.write("".join(f"{name}_{num}\thttp://127.0.0.9:{port}/{num}.jpg\n"
                                     for num in range(per_synset)))
                continue
            selected.append(name)
            base = index * per_synset
            handle.write("".join(
                f"{name}_{num}\thttp://{host(base + num, hosts)}:{port}/{num}.jpg\n"
                for num in range(per_synset)))
    return selected


def closed_port() -> int:
    """A port nothing listens on (bound, then released): connections to it are refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in kB; zeros once it is gone."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as handle:
            for line in handle:
                if line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith(b"VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        pass
    return rss, hwm


@dataclass
class Measured:
    seconds: float
    tree_rss_mb: float
    tree_pss_mb: float
    coordinator_hwm_mb: float


class Sampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.rss = self.pss = self.hwm = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            tree = process_tree(self.pid)
            figures = [rss_kb(pid) for pid in tree]
            self.rss = max(self.rss, sum(rss for rss, _ in figures))
            self.pss = max(self.pss, sum(pss_kb(pid) for pid in tree))
            self.hwm = max(self.hwm, rss_kb(self.pid)[1])
            self.done.wait(SAMPLE_SECONDS)


def run_gather(urls: Path, wnids_file: Path, out: Path, log: Path) -> Measured:
    argv = [sys.executable, "-m", "pipeline", "-q", "gather", "--urls", str(urls),
            "--wnids-file", str(wnids_file), "--out", str(out), "--processes", "2"]
    started = time.perf_counter()
    with open(log, "ab") as output:
        process = subprocess.Popen(argv, cwd=REPO, stdout=output, stderr=subprocess.STDOUT)
        sampler = Sampler(process.pid)
        sampler.start()
        try:
            code = process.wait(timeout=RUN_TIMEOUT)
        finally:
            sampler.done.set()
            sampler.join()
            if process.poll() is None:
                process.kill()
    seconds = time.perf_counter() - started
    if code != 0:
        tail = log.read_text(errors="replace").splitlines()[-10:]
        sys.exit(f"gather failed ({code}):\n" + "\n".join(tail))
    return Measured(seconds, sampler.rss / 1024, sampler.pss / 1024, sampler.hwm / 1024)


def journal_outcomes(journal: Path) -> Counter[str]:
    """Outcomes of every journal line (a few seconds for millions of lines)."""
    counts: Counter[str] = Counter()
    with open(journal, "rb") as handle:
        for line in handle:
            counts[json.loads(line)["outcome"]] += 1
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synsets", type=int, default=10_000)
    parser.add_argument("--per-synset", type=int, default=1_400)
    parser.add_argument("--every", type=int, default=10, help="select every Nth synset")
    parser.add_argument("--hosts", type=int, default=4096)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--target-mb", type=float, default=300.0)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-gather-memory-", dir=args.workdir))
    try:
        bench(args, work)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(work)


def bench(args: argparse.Namespace, work: Path) -> None:
    urls, wnids_file, out, log = (work / "urls.txt", work / "wnids.txt", work / "raw",
                                  work / "gather.log")
    started = time.perf_counter()
    wnids = write_list(urls, args.synsets, args.per_synset, args.every, args.hosts,
                       closed_port())
    wnids_file.write_text("\n".join(wnids) + "\n")
    lines = args.synsets * args.per_synset
    print(f"list: {lines:,} lines ({urls.stat().st_size / 2**20:.0f} MiB) written in "
          f"{time.perf_counter() - started:.1f} s; {len(wnids):,} synsets selected "
          f"({len(wnids) * args.per_synset:,} URLs)", flush=True)
    runs = {}
    for name in ("first run", "resume"):
        runs[name] = measured = run_gather(urls, wnids_file, out, log)
        print(f"{name}: {measured.seconds:.1f} s, peak tree RSS {measured.tree_rss_mb:.0f} MB, "
              f"peak tree PSS {measured.tree_pss_mb:.0f} MB, coordinator HWM "
              f"{measured.coordinator_hwm_mb:.0f} MB", flush=True)
    counts = journal_outcomes(out / "gather.jsonl")
    print(f"journal: {sum(counts.values()):,} lines, "
          + ", ".join(f"{outcome} {count:,}" for outcome, count in counts.most_common()))
    worst = max(m.tree_rss_mb for m in runs.values())
    verdict = "met" if worst <= args.target_mb else "NOT met"
    print(f"SUMMARY gather memory: {len(wnids) * args.per_synset:,} URLs of a {lines:,}-line "
          f"list: first run {runs['first run'].seconds:.0f} s / "
          f"{runs['first run'].tree_rss_mb:.0f} MB, resume {runs['resume'].seconds:.0f} s / "
          f"{runs['resume'].tree_rss_mb:.0f} MB peak tree RSS; target <= {args.target_mb:.0f} "
          f"MB {verdict}")


if __name__ == "__main__":
    main()

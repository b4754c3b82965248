#!/usr/bin/env python3
"""Benchmark `pipeline gather` against img2dataset 1.47.0 on the same URLs, same server, same run.

The claim to check: on a list where a fifth of the URLs are dead and some hang past the timeout,
our one-URL-at-a-time worker pool turns out >= 2x img2dataset's good images/s (the issue puts
img2dataset at ~580/s, its shards waiting for their slowest URL). Both clients are whole
commands (start-up included) run one after the other as subprocesses against one local mirror
(`serve_sample.py`), which runs in a process of its own so it shares a GIL with neither.
Also times `urllist.select_urls` over a 10-million-line `fall11_urls.txt`-style list.

    python scripts/bench_gather.py [--urls 10000] [--workdir DIR] [--skip-img2dataset]
                                   [--repeat 1] [--shard-size 10000] [--img2dataset-venv DIR]
                                   [--filter-lines 10000000] [--max-other-load 0.10]
                                   [--quiet-wait 120]

The box may be shared: before each timed command the script waits (up to --quiet-wait s) until
other processes use <= --max-other-load of the cores, and prints the share they took meanwhile
("other load"); figures from a disturbed run say so.

Run it with the project's venv python. img2dataset is installed, if missing, into its own venv
(--img2dataset-venv, default /work/bench-venvs/img2dataset) so its dependencies never touch ours.

Memory: "max RSS" is the kernel's exact peak RSS of the largest single process of the command
(wait4 in a tiny launcher); "peak PSS" is the largest summed proportional set size of the
command's whole process tree (img2dataset's worker processes included), sampled every 50 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))

import benchlib  # noqa: E402
from benchlib import Quiet, Run  # noqa: E402
from make_sample import build_url_list, make_sample  # noqa: E402

I2D_VERSION = "1.47.0"
DEFAULT_I2D_VENV = Path("/work/bench-venvs/img2dataset")
LATENCY = 0.05
TIMEOUT = 3
CONCURRENCY = 256
PROCESSES = 2
# 20% of the URLs fail, all in ways both clients count as failures (img2dataset keeps
# truncated JPEGs, thumbnails and placeholders, so those kinds would skew "good images").
# `slow` answers after 30 s: 4% of the URLs hang past the 3 s timeout.
MIX: dict[str, float] = {"slow": 0.04, "404": 0.06, "410": 0.02, "500": 0.02, "403": 0.02,
                         "reset": 0.02, "html": 0.01, "mislabeled": 0.01}
SAMPLE_FILES = 300  # distinct pictures; further URLs reuse them with distinct bytes (/uniq/)
TARGET_RATIO = 2.0
FILTER_LINES = 10_000_000
FILTER_PER_SYNSET = 1000
FILTER_TARGET_LPS = 1_000_000
FILTER_TARGET_MB = 200
FILTER_REPEAT = 3
SERVER_START_SECONDS = 30.0
INODE_SETTLE_SECONDS = 65  # see clear_outputs


# --------------------------------------------------------------------------- measuring
# Whole commands are run and measured by benchlib.run_measured (max RSS, peak PSS, other load).

def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile; enough for p50/p95 over thousands of URLs."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


# --------------------------------------------------------------------------- the mirror

@dataclass
class Mirror:
    base_url: str
    process: subprocess.Popen[bytes]


@contextlib.contextmanager
def mirror_process(root: Path, latency: float, max_seconds: float,
                   log: Path) -> Iterator[Mirror]:
    """serve_sample.py in its own process on a free port; stopped (SIGTERM, then kill) on exit.

    Its own --max-seconds bounds it even if this script dies without cleaning up.
    """
    argv = [sys.executable, str(SCRIPTS / "serve_sample.py"), "--root", str(root),
            "--port", "0", "--latency", str(latency), "--max-seconds", str(max_seconds),
            "--max-requests", str(10**8)]
    with open(log, "wb") as errors:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors)
    try:
        yield Mirror(_wait_until_serving(process, log), process)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until_serving(process: subprocess.Popen[bytes], log: Path) -> str:
    """The URL from the server's one `serving http://HOST:PORT` line."""
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(SERVER_START_SECONDS):
            sys.exit(f"the mirror did not start within {SERVER_START_SECONDS:g} s (see {log})")
    line = process.stdout.readline().decode().strip()
    if not line.startswith("serving "):
        sys.exit(f"the mirror did not start: {line!r} (see {log})")
    return line.split(" ", 1)[1]


# --------------------------------------------------------------------------- the two clients

@dataclass
class ClientResult:
    name: str
    run: Run
    urls: int
    good: int
    outcomes: Counter[str]
    url_seconds: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def good_per_second(self) -> float:
        return self.good / self.run.seconds


def write_lists(sample: Path, wnid: str, base_url: str, workdir: Path,
                urls: int) -> tuple[Path, Path]:
    """One fall11-style list for ours and the same URLs, one per line, for img2dataset."""
    ours = workdir / "urls.txt"
    build_url_list(sample, base_url, ours, wnids=[wnid], per_synset=urls, mix=MIX, malformed=0)
    plain = workdir / "urls-img2dataset.txt"
    lines = ours.read_text(encoding="utf-8").splitlines()
    plain.write_text("".join(line.split("\t", 1)[1] + "\n" for line in lines), encoding="utf-8")
    return ours, plain


def fresh_output(out: Path) -> None:
    """A new, empty `out`, and every dirty page flushed, so no writeback from an earlier command
    lands in the timed one. Never emptied by deleting: see `clear_outputs`."""
    if out.exists():
        raise FileExistsError(f"{out} exists; outputs are deleted only by clear_outputs")
    out.mkdir(parents=True)
    os.sync()


def clear_outputs(runs_dir: Path, settle: bool) -> None:
    """Delete earlier runs' outputs, only ever outside the timed runs.

    ext4 without a journal (as on this VM) skips inodes freed in the last 60 s when it allocates
    new ones, scanning the inode table: right after deleting 10,000+ files, creating files
    costs seconds of system time (perf: `recently_deleted`, and `rwsem_spin_on_owner` in
    rename/open as writers queue on the directory lock). So each run writes to a new folder,
    all are deleted at the end, and leftovers found at start-up are deleted, then waited out.
    """
    if not runs_dir.exists():
        return
    shutil.rmtree(runs_dir)
    os.sync()
    if settle:
        print(f"deleted old outputs; waiting {INODE_SETTLE_SECONDS} s for ext4 to allow "
              "reuse of their inodes ...", flush=True)
        time.sleep(INODE_SETTLE_SECONDS)


def run_ours(urls: Path, wnid: str, out: Path, mirror: Mirror, log: Path) -> ClientResult:
    """`pipeline gather` from an empty output folder (a journal left over would resume)."""
    fresh_output(out)
    argv = [sys.executable, "-m", "pipeline", "-q", "gather", "--urls", str(urls),
            "--wnid", wnid, "--out", str(out), "--concurrency", str(CONCURRENCY),
            "--per-host", str(CONCURRENCY), "--timeout", str(TIMEOUT), "--retries", "0"]
    run = benchlib.run_measured(argv, log, cwd=REPO, helper_pid=mirror.process.pid)
    records = [json.loads(line) for line in (out / "gather.jsonl").open(encoding="utf-8")]
    outcomes = Counter(record["outcome"] for record in records)
    return ClientResult("pipeline gather", run, len(records), outcomes["ok"], outcomes,
                        [record["seconds"] for record in records])


def ensure_img2dataset(venv: Path) -> Path:
    """img2dataset 1.47.0 in a venv of its own (created on first use): its pins stay out of ours."""
    exe = venv / "bin" / "img2dataset"
    check = [str(venv / "bin" / "python"), "-c",
             "import importlib.metadata as m; print(m.version('img2dataset'))"]
    if exe.exists():
        found = subprocess.run(check, capture_output=True, text=True).stdout.strip()
        if found == I2D_VERSION:
            return exe
    print(f"installing img2dataset=={I2D_VERSION} into {venv} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet",
                    f"img2dataset=={I2D_VERSION}"], check=True)
    return exe


def run_img2dataset(exe: Path, urls: Path, out: Path, shard_size: int,
                    mirror: Mirror, log: Path) -> ClientResult:
    """The anchor with the issue's flags; its per-shard *_stats.json give the counts."""
    fresh_output(out)
    argv = [str(exe), "--url_list", str(urls), "--input_format", "txt",
            "--output_folder", str(out), "--processes_count", str(PROCESSES),
            "--thread_count", str(CONCURRENCY), "--timeout", str(TIMEOUT), "--retries", "0",
            "--resize_mode", "no", "--output_format", "files",
            "--number_sample_per_shard", str(shard_size)]
    env = {**os.environ, "WANDB_MODE": "disabled", "WANDB_SILENT": "true"}
    run = benchlib.run_measured(argv, log, cwd=REPO, env=env, helper_pid=mirror.process.pid)
    shards = [json.loads(path.read_text()) for path in sorted(out.glob("*_stats.json"))]
    outcomes: Counter[str] = Counter()
    for shard in shards:
        outcomes["success"] += shard["successes"]
        outcomes["failed_to_download"] += shard["failed_to_download"]
        outcomes["failed_to_resize"] += shard["failed_to_resize"]
    durations = [shard["duration"] for shard in shards]
    note = (f"{len(shards)} shard(s) of <= {shard_size} URLs, shard seconds "
            f"{min(durations):.1f}..{max(durations):.1f}" if durations else "no shard stats")
    return ClientResult(f"img2dataset {I2D_VERSION}", run, sum(s["count"] for s in shards),
                        outcomes["success"], outcomes, [], note)


# --------------------------------------------------------------------------- URL-list filtering

def filter_list(workdir: Path, lines: int) -> tuple[Path, list[str]]:
    """A cached `fall11_urls.txt`-style list of `lines` lines, ~1000 per synset, wnid-sorted.

    Returns it and two wnids to select (one mid-file, one near the end, so the scan is full).
    """
    synsets = max(1, lines // FILTER_PER_SYNSET)
    path = workdir / f"fall11_urls-{lines}.txt"
    wnids = [_filter_wnid(synsets // 2), _filter_wnid(synsets - 2 if synsets > 2 else 0)]
    if path.exists():
        return path, wnids
    print(f"generating {path} ({lines:,} lines, {synsets:,} synsets) ...", flush=True)
    temp = path.with_suffix(".partial")
    with open(temp, "w", encoding="ascii") as handle:
        done = 0
        for index in range(synsets):
            count = lines - done if index == synsets - 1 else _synset_size(index)
            handle.write(_synset_block(index, count))
            done += count
    temp.replace(path)
    return path, wnids


def _filter_wnid(index: int) -> str:
    return f"n{1440764 + index * 97:08d}"


def _synset_size(index: int) -> int:
    """700..1300 lines, alternating above and below 1000 so the total stays near lines."""
    offset = (index // 2 * 7919) % 301
    return FILTER_PER_SYNSET + (offset if index % 2 else -offset)


def _synset_block(index: int, count: int) -> str:
    """Flickr-shaped URLs, with some other hosts, as in the real list; deterministic."""
    wnid = _filter_wnid(index)
    rows = []
    for num in range(1, count + 1):
        key = index * 1_000_003 + num
        if key % 5:
            url = (f"http://farm{key % 4 + 1}.static.flickr.com/{key % 3571}/"
                   f"{key * 2654435761 % 10**10}_{key * 40503 & 0xFFFFFFFFFF:010x}.jpg")
        else:
            url = f"http://www.site{key % 9973}.com/images/photos/{wnid}/{key:x}.jpg"
        rows.append(f"{wnid}_{num}\t{url}\n")
    return "".join(rows)


FILTER_CHILD = """
import json, sys, time
from pathlib import Path
started = time.perf_counter()
from pipeline.urllist import select_urls
imported = time.perf_counter()
selection = select_urls(Path(sys.argv[1]), {w: w for w in sys.argv[2:]})
print(json.dumps({"lines": selection.lines, "selected": len(selection.entries),
                  "scan_seconds": time.perf_counter() - imported}))
"""


@dataclass
class FilterResult:
    lines: int
    selected: int
    scan_seconds: float
    run: Run

    @property
    def lines_per_second(self) -> float:
        return self.lines / self.scan_seconds


def bench_filter(path: Path, wnids: list[str], log: Path) -> FilterResult:
    """select_urls in a fresh interpreter; median scan time of a few runs, warm page cache."""
    with open(path, "rb") as handle:  # warm the page cache so every run reads from memory
        while handle.read(2**24):
            pass
    results = []
    for _ in range(FILTER_REPEAT):
        run = benchlib.run_measured([sys.executable, "-c", FILTER_CHILD, str(path), *wnids], log,
                                   cwd=REPO)
        lines = log.read_text().splitlines()
        figures = json.loads(lines[-1])
        results.append(FilterResult(figures["lines"], figures["selected"],
                                    figures["scan_seconds"], run))
    results.sort(key=lambda result: result.scan_seconds)
    median = results[len(results) // 2]
    median.run.max_rss_mb = max(result.run.max_rss_mb for result in results)
    median.run.other_load = max(result.run.other_load for result in results)
    return median


# --------------------------------------------------------------------------- reporting

def client_table(results: list[ClientResult]) -> str:
    rows = [["client", "URLs", "good", "seconds", "good img/s", "p50 s/URL", "p95 s/URL",
             "CPU s", "max RSS MB", "peak PSS MB", "server CPU s", "other load"]]
    for result in results:
        times = result.url_seconds
        rows.append([result.name, str(result.urls), str(result.good),
                     f"{result.run.seconds:.1f}", f"{result.good_per_second:.0f}",
                     f"{percentile(times, 0.50):.3f}" if times else "n/a",
                     f"{percentile(times, 0.95):.3f}" if times else "n/a",
                     f"{result.run.cpu_seconds:.1f}", f"{result.run.max_rss_mb:.0f}",
                     f"{result.run.peak_pss_mb:.0f}", f"{result.run.helper_cpu_seconds:.1f}",
                     f"{result.run.other_load:.0%}"])
    return benchlib.format_table(rows)


def outcome_lines(results: list[ClientResult]) -> Iterator[str]:
    for result in results:
        counts = ", ".join(f"{name} {count}" for name, count in result.outcomes.most_common())
        yield f"  {result.name}: {counts}" + (f"; {result.note}" if result.note else "")


def filter_table(result: FilterResult) -> str:
    rows = [["select_urls", "lines", "selected", "scan s", "lines/s", "command s", "max RSS MB",
             "other load"],
            ["2 wnids", f"{result.lines:,}", str(result.selected), f"{result.scan_seconds:.2f}",
             f"{result.lines_per_second / 1e6:.2f} M", f"{result.run.seconds:.2f}",
             f"{result.run.max_rss_mb:.0f}", f"{result.run.other_load:.0%}"]]
    return benchlib.format_table(rows)


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def summary_line(urls: int, ours: ClientResult, anchor: ClientResult | None,
                 flt: FilterResult) -> str:
    if anchor is None:
        gather = f"ours {ours.good_per_second:.0f} good img/s (img2dataset skipped)"
    else:
        ratio = ours.good_per_second / anchor.good_per_second
        gather = (f"ours {ours.good_per_second:.0f} vs img2dataset {anchor.good_per_second:.0f} "
                  f"good img/s = {ratio:.2f}x (target >= {TARGET_RATIO:g}x: "
                  f"{verdict(ratio >= TARGET_RATIO)})")
    filter_ok = (flt.lines_per_second >= FILTER_TARGET_LPS
                 and flt.run.max_rss_mb < FILTER_TARGET_MB)
    return (f"summary: {urls} URLs (20% failing, 4% hang > {TIMEOUT} s, {LATENCY * 1000:.0f} ms "
            f"latency): {gather}; URL filter {flt.lines:,} lines at "
            f"{flt.lines_per_second / 1e6:.2f}M lines/s, max RSS {flt.run.max_rss_mb:.0f} MB "
            f"(targets >= 1M lines/s, < {FILTER_TARGET_MB} MB: {verdict(filter_ok)})")


def header(args: argparse.Namespace, workdir: Path) -> str:
    import aiohttp

    mix = ", ".join(f"{kind} {share:.0%}" for kind, share in MIX.items())
    return (f"python {platform.python_version()}, aiohttp {aiohttp.__version__}; "
            f"{os.cpu_count()} cores; workdir {workdir}\n"
            f"{args.urls} URLs of one synset via serve_sample.py (own process, "
            f"--latency {LATENCY:g}); failing mix: {mix}\n"
            f"both clients: {CONCURRENCY} in flight, timeout {TIMEOUT} s, no retries; "
            f"img2dataset: {PROCESSES} processes, {args.shard_size} URLs per shard; "
            f"seconds = whole command, start-up included")


# --------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--urls", type=int, default=10_000, help="URLs in the list (10000)")
    parser.add_argument("--workdir", type=Path,
                        default=Path(tempfile.gettempdir()) / "bench_gather",
                        help="sample, lists and outputs; the 10M-line list is cached here")
    parser.add_argument("--skip-img2dataset", action="store_true")
    parser.add_argument("--img2dataset-venv", type=Path, default=DEFAULT_I2D_VENV)
    parser.add_argument("--shard-size", type=int, default=10_000,
                        help="img2dataset --number_sample_per_shard (its default: 10000)")
    parser.add_argument("--filter-lines", type=int, default=FILTER_LINES)
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per client; the median one is reported")
    parser.add_argument("--max-other-load", type=float, default=0.10,
                        help="wait before each run until other processes use at most this "
                             "share of the cores (default 0.10)")
    parser.add_argument("--quiet-wait", type=float, default=120.0,
                        help="longest wait for that, in seconds (then run anyway)")
    return parser.parse_args(argv)


def bench_clients(args: argparse.Namespace, workdir: Path,
                  quiet: Quiet) -> dict[str, list[ClientResult]]:
    """Both clients against one mirror process, one after the other, alternating who goes first
    on each repetition so neither always meets a warmer (or more tired) server."""
    exe = None if args.skip_img2dataset else ensure_img2dataset(args.img2dataset_venv)
    clear_outputs(workdir / "runs", settle=True)
    sample = workdir / "sample"
    wnid = make_sample(sample, classes=1, per_class=SAMPLE_FILES, workers=2)[0]
    # Generous: every run of both clients at a crawling 20 URLs/s, after the longest wait for
    # quiet, would still fit.
    budget = 300 + args.repeat * 2 * (args.urls / 20 + quiet.max_wait)
    results: dict[str, list[ClientResult]] = {"ours": [], "img2dataset": []}
    with mirror_process(sample, LATENCY, budget, workdir / "mirror.log") as mirror:
        ours_list, plain_list = write_lists(sample, wnid, mirror.base_url, workdir, args.urls)
        for rep in range(args.repeat):
            order = ["ours", "img2dataset"] if rep % 2 == 0 else ["img2dataset", "ours"]
            for client in order:
                if client == "img2dataset" and exe is None:
                    continue
                benchlib.wait_for_quiet(quiet, mirror.process.pid)
                out = workdir / "runs" / f"{client}-{rep + 1}"
                if client == "ours":
                    result = run_ours(ours_list, wnid, out, mirror, workdir / "ours.log")
                else:
                    result = run_img2dataset(exe, plain_list, out, args.shard_size, mirror,
                                             workdir / "img2dataset.log")
                results[client].append(result)
                print(f"  run {rep + 1} {result.name}: {result.good_per_second:.0f} good img/s, "
                      f"other load {result.run.other_load:.0%}", flush=True)
    return {client: runs for client, runs in results.items() if runs}


def median_run(runs: list[ClientResult]) -> ClientResult:
    """The run with the median good images/s (the lower middle one for an even count)."""
    return sorted(runs, key=lambda result: result.good_per_second)[(len(runs) - 1) // 2]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    quiet = Quiet(args.max_other_load, args.quiet_wait)
    print(header(args, workdir), flush=True)
    runs = bench_clients(args, workdir, quiet)
    clear_outputs(workdir / "runs", settle=False)
    chosen = [median_run(client_runs) for client_runs in runs.values()]
    print()
    print(client_table(chosen))
    print("outcomes:")
    print("\n".join(outcome_lines(chosen)))
    ours, anchor = chosen[0], chosen[1] if len(chosen) == 2 else None
    if anchor is not None:
        print(f"ratio ours/img2dataset (good images/s): "
              f"{ours.good_per_second / anchor.good_per_second:.2f}x "
              f"(target >= {TARGET_RATIO:g}x)")
    if len(runs) == 2 and args.repeat > 1:
        pairs = zip(runs["ours"], runs["img2dataset"], strict=True)
        print("ratio per repetition (back-to-back pairs): " + ", ".join(
            f"{a.good_per_second / b.good_per_second:.2f}x "
            f"(other load {max(a.run.other_load, b.run.other_load):.0%})" for a, b in pairs))
    print("p50/p95 s/URL: ours from the journal's `seconds` (fetch only, checks and write "
          "excluded); img2dataset records no per-URL time (n/a)")
    path, wnids = filter_list(workdir, args.filter_lines)
    benchlib.wait_for_quiet(quiet)
    flt = bench_filter(path, wnids, workdir / "filter.log")
    print()
    print(filter_table(flt))
    print(f"  median of {FILTER_REPEAT} fresh interpreters, warm page cache, "
          f"{path.stat().st_size / 2**20:.0f} MiB file; max RSS = largest of the runs")
    worst = max([run.run.other_load for client_runs in runs.values() for run in client_runs]
                + [flt.run.other_load])
    warning = benchlib.disturbed_warning(worst, quiet.max_other)
    if warning:
        print(warning)
    print(summary_line(args.urls, ours, anchor, flt))


if __name__ == "__main__":
    main()

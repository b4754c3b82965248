#!/usr/bin/env python3
"""Benchmark `pipeline gather` against img2dataset 1.47.0 on the same URLs, same server, same run.

The claim to check: ours turns out >= 2x img2dataset's good images/s (the issue puts img2dataset
at ~580/s, its shards waiting for their slowest URL). Three scenarios (`--scenario`, default
all), each with its own summary line:

- `mirror`: one host (`serve_sample.py`), a fifth of the URLs failing per path, 4% hanging past
  the 3 s timeout; both clients with the issue's flags (256 in flight, timeout 3 s, no retries;
  ours also --per-host 256, as there is one host); img2dataset with SHARDS_PER_PROCESS shards
  per process.
- `hosts`: shaped like the real ImageNet list: `--hosts` (300) hosts of `serve_web.py`, each on
  its own 127.x address, the URLs spread Zipf-like over them (a few big hosts hold most URLs);
  a third of the hosts refuse connections, 5% drop them (blackhole), 3% trickle, 5% answer
  every path with an HTML "not found" page (soft404), 4% with one "image not found" JPEG
  (placeholder), the rest are alive with the mirror scenario's per-path failure mix (MIX,
  `slow` included: a live server's hung URLs must not take the host down). The real web's
  DNS-dead hosts (`dns_dead`) are folded into `refusing`: names need a DNS, see `world`.
  Trickle hosts send a byte every TRICKLE_EVERY = 5 s, above img2dataset's
  3 s read timeout: at serve_web.py's default of one byte every 2 s, img2dataset (urllib,
  whose timeout bounds each read, not the body) never finishes such a URL and its run never
  ends. No `endless` hosts, for the same reason. img2dataset gets IP-literal URLs and the
  same flags as in `mirror`; ours runs with its *default* options (what users run: per-host
  limit, timeouts, retries, host health all as shipped) and hostname URLs mapped with one
  `--resolve HOST:PORT:ADDR` per host (~35 bytes each, ~11 KB of argv for 300 hosts), so no
  DNS query is ever sent. A placeholder host's picture counted as a good image is a "kept
  placeholder": for ours an ok record (the last one of its id: gather journals an id again
  when it takes an image back) whose sha256 is in `WebLayout.placeholder_digests()`; for
  img2dataset, which re-encodes every image so no file keeps those bytes, a success whose URL
  is on a placeholder host (its per-image .json). Good images exclude them; the target also
  asks for none kept.
- `world`: serve_web.py's real world (`build_real_world`, `serve_world_process`): 20,000 URLs
  (`--urls`) of 200 synsets over ~5,500 hosts with real-looking names, answered by
  fake_dns.py: Flickr's farms (64% of the URLs, 40% of them redirected to the "photo
  unavailable" picture), dead names (NXDOMAIN, or no answer under load), refusing,
  blackholed, trickling (1 byte / 2 s), soft-404 and placeholder hosts, 30-80 ms per host.
  Both clients use the *system resolver*: each runs in a private mount namespace (`unshare
  -m`) whose /etc/resolv.conf names the fake DNS on 127.0.0.53:53 (`--dns-address`; the next
  free 127.0.0.x if taken), so nothing but their resolv.conf changes and the machine's own
  is untouched. Before the runs a world name must resolve there to its 127.x address, through
  glibc (`getent`, as img2dataset) and c-ares (as ours), and the fake DNS must have seen the
  queries; each command checks again (getent) before it execs, or the benchmark aborts: a
  client outside the namespace would send the fake names to the machine's real resolver.
  Ours: default options, `--wnids-file` of the 200 synsets. img2dataset: its defaults
  (timeout 10 s, retries 0, re-encoding every image) with 2 processes x 256 threads and one
  shard per process (URLs / processes): with more shards, its first shards hang on trickling
  hosts (urllib's per-read timeout never fires on a byte every 2 s) and the later shards never
  start. Even so it never ends, so it is stopped once no new file appeared for I2D_IDLE s
  (or at --run-timeout). Both are compared up to their last image: good images / (time of
  the last image kept - start), ours from its journal's `time`, img2dataset from the mtime of
  its last image file; ours' whole run (it ends by itself) is reported too. Good = kept and
  expected `ok` (`World.expected()`); kept placeholders = kept and expected `placeholder`
  (img2dataset's via its per-image .json `url`). Target: >= 2x img2dataset's good images/s,
  >= 97% of the good images kept, no placeholder kept.

img2dataset runs with NO_ALBUMENTATIONS_UPDATE=1: albumentations would otherwise look up
pypi.org at import (a DNS query to the machine's resolver, outside 127.0.0.0/8).

Also times `urllist.select_urls` over a 10-million-line `fall11_urls.txt`-style list (skip
with --filter-lines 0).

    python scripts/bench/gather.py [--scenario all|mirror|hosts|world] [--urls N] [--hosts 300]
                                   [--dns-address 127.0.0.53] [--repeat 3] [--max-tries 9]
                                   [--max-other-load 0.10] [--quiet-wait 120]
                                   [--run-timeout 600] [--workdir DIR]
                                   [--skip-img2dataset] [--img2dataset-venv DIR]
                                   [--shard-size N] [--filter-lines 10000000]

Reporting rule: a ratio measured under foreign load is not a result. Both clients run back to
back as a pair (alternating who goes first), each pair gives one ratio, and the reported ratio
is the median over `--repeat` (default 3) *quiet* pairs. Before each command the script waits
(up to --quiet-wait s) until other processes use <= --max-other-load of the cores; a pair
during which they used more ("other load", measured by benchlib over each command) is printed,
discarded and run again, at most --max-tries pairs in all. If that many tries do not give the
quiet pairs wanted, the scenario reports NO RESULT (loudly, and in its summary line) instead
of a ratio. Every command has a time limit (--run-timeout; the whole process tree is killed
past it; img2dataset in `world` is stopped there, see above) and the servers stop by
themselves even if this script dies. `--urls` defaults to 10,000 (mirror, hosts) and 20,000
(world; its sample needs ~9,632 distinct pictures: 10 classes x 1,100).

Run it with the project's venv python. img2dataset is installed, if missing, into its own venv
(--img2dataset-venv, default /work/bench-venvs/img2dataset) so its dependencies never touch ours.

Memory: "max RSS" is the kernel's exact peak RSS of the largest single process of the command
(wait4 in a tiny launcher); "peak PSS" is the largest summed proportional set size of the
command's whole process tree (img2dataset's worker processes included), sampled every 50 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

from pipeline.testing.make_sample import build_url_list, make_sample  # noqa: E402
from pipeline.testing.serve_web import (  # noqa: E402
    WebLayout,
    WorldProcess,
    build_web_url_list,
    serve_web_process,
    serve_world_process,
)

import benchlib  # noqa: E402
from benchlib import CommandTimeout, Quiet, Run  # noqa: E402

I2D_VERSION = "1.47.0"
DEFAULT_I2D_VENV = Path("/work/bench-venvs/img2dataset")
LATENCY = 0.05
TIMEOUT = 3
CONCURRENCY = 256
PROCESSES = 2
SHARDS_PER_PROCESS = 4  # img2dataset: several shards per process, so none idles at the end
# 20% of the URLs fail, all in ways both clients count as failures (img2dataset keeps
# truncated JPEGs, thumbnails and placeholders, so those kinds would skew "good images").
# `slow` answers after 30 s: 4% of the URLs hang past the 3 s timeout.
MIX: dict[str, float] = {"slow": 0.04, "404": 0.06, "410": 0.02, "500": 0.02, "403": 0.02,
                         "reset": 0.02, "html": 0.01, "mislabeled": 0.01}
# The hosts scenario: shares of hosts (serve_web.py behaviours). serve_web's DEFAULT_HOST_MIX
# has dns_dead 18% + refusing 8%; here all of that (and a little more) refuses, see above.
HOST_MIX: dict[str, float] = {"alive": 0.50, "refusing": 0.33, "blackhole": 0.05,
                              "trickle": 0.03, "soft404": 0.05, "placeholder": 0.04}
HOSTS = 300
TRICKLE_EVERY = 5.0  # > TIMEOUT, or img2dataset never finishes a trickle URL
TARGET_RATIO = 2.0
REPEAT = 3
MIN_PAIRS = 3  # the reporting rule: fewer quiet pairs than this is no result
FILTER_LINES = 10_000_000
FILTER_PER_SYNSET = 1000
FILTER_TARGET_LPS = 1_000_000
FILTER_TARGET_MB = 200
FILTER_REPEAT = 3
SERVER_START_SECONDS = 30.0
INODE_SETTLE_SECONDS = 65  # see clear_outputs
RUN_TIMEOUT = 600.0
SCENARIOS = ("mirror", "hosts", "world")
URLS = 10_000  # mirror and hosts
# The world: 20,000 URLs need ~9,632 distinct pictures (serve_web says how many if short).
WORLD_URLS = 20_000
WORLD_SAMPLE = {"classes": 10, "per_class": 1100}
DNS_ADDRESS = "127.0.0.53"  # port 53: the only port resolv.conf can name
RESOLV_CONF = "nameserver {address}\noptions timeout:5 attempts:2\n"
GUARD_NAME = "farm1.static.flickr.com"  # must resolve to its 127.x address in the namespace
GUARD_EXIT = 97
I2D_IDLE = 30.0  # img2dataset in the world never ends: stopped after this long without a file
I2D_STARTUP = 30.0  # more seconds allowed before its first file
TARGET_GOOD_SHARE = 0.97  # world: of the URLs that should give an image
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}


# --------------------------------------------------------------------------- measuring
# Whole commands are run and measured by benchlib.run_measured (max RSS, peak PSS, other load).

def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile; enough for p50/p95 over thousands of URLs."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


# --------------------------------------------------------------------------- the servers

@dataclass
class MirrorServer:
    base_url: str
    process: subprocess.Popen[bytes]


@contextlib.contextmanager
def mirror_process(root: Path, latency: float, max_seconds: float,
                   log: Path) -> Iterator[MirrorServer]:
    """serve_sample.py in its own process on a free port; stopped (SIGTERM, then kill) on exit.

    Its own --max-seconds bounds it even if this script dies without cleaning up.
    """
    argv = [sys.executable, "-m", "pipeline.testing.serve_sample", "--root", str(root),
            "--port", "0", "--latency", str(latency), "--max-seconds", str(max_seconds),
            "--max-requests", str(10**8)]
    with open(log, "wb") as errors:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors)
    try:
        yield MirrorServer(_wait_until_serving(process, log), process)
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


@dataclass
class Setup:
    """One scenario, served: the lists and arguments both clients need, and its description."""

    name: str
    helper_pid: int  # the server process: its CPU is ours, not other load
    wnid: str
    ours_list: Path  # fall11-style, for ours
    plain_list: Path  # one URL a line, for img2dataset
    ours_args: list[str]  # options after --urls/--wnid/--out
    _: KW_ONLY
    placeholders: set[str] = field(default_factory=set)  # sha256 of placeholder pictures
    placeholder_hosts: set[str] = field(default_factory=set)  # their NAME:PORT and ADDR:PORT
    about: str = ""  # header lines
    urls: int = 0  # lines in the lists
    shard_size: int = 1  # img2dataset --number_sample_per_shard
    select: list[str] = field(default_factory=list)  # ours' synsets; empty: --wnid wnid
    wrapper: list[str] = field(default_factory=list)  # argv prefix of both clients (namespace)
    i2d_flags: list[str] | None = None  # img2dataset's options; None: the flags
    i2d_idle: float | None = None  # stop img2dataset after this long without a new file
    # world: id -> the outcome a correct client records, and each URL's id
    expected: dict[str, str] = field(default_factory=dict)
    id_of_url: dict[str, str] = field(default_factory=dict)
    dns_queries: Callable[[], int] | None = None  # queries the fake DNS received so far

    @property
    def good_expected(self) -> int:
        """URLs that should give an image (world)."""
        return sum(outcome == "ok" for outcome in self.expected.values())


def write_plain(fall11: Path, plain: Path) -> None:
    """The URLs of a fall11-style list, one per line, for img2dataset's txt input."""
    lines = fall11.read_text(encoding="utf-8").splitlines()
    plain.write_text("".join(line.split("\t", 1)[1] + "\n" for line in lines), encoding="utf-8")


def server_budget(args: argparse.Namespace, quiet: Quiet) -> float:
    """Seconds a server may live: every try of a pair at its time limits, and then some."""
    return 300 + args.max_tries * 2 * (args.run_timeout + quiet.max_wait + 30)


def scenario_urls(args: argparse.Namespace, name: str) -> int:
    """--urls, or the scenario's default."""
    if args.urls is not None:
        return int(args.urls)
    return WORLD_URLS if name == "world" else URLS


def shard_size(args: argparse.Namespace, name: str, urls: int) -> int:
    """--shard-size, or SHARDS_PER_PROCESS shards per process (mirror, hosts: none idles at
    the end, as img2dataset's docs advise), or one per process (world: see the docstring)."""
    if args.shard_size is not None:
        return int(args.shard_size)
    shards = PROCESSES if name == "world" else SHARDS_PER_PROCESS * PROCESSES
    return max(1, -(-urls // shards))


@contextlib.contextmanager
def mirror_scenario(args: argparse.Namespace, workdir: Path, sample: Path, wnid: str,
                    quiet: Quiet) -> Iterator[Setup]:
    urls = scenario_urls(args, "mirror")
    shard = shard_size(args, "mirror", urls)
    with mirror_process(sample, LATENCY, server_budget(args, quiet),
                        workdir / "mirror.log") as mirror:
        ours = workdir / "urls.txt"
        build_url_list(sample, mirror.base_url, ours, wnids=[wnid], per_synset=urls,
                       mix=MIX, malformed=0)
        plain = workdir / "urls-img2dataset.txt"
        write_plain(ours, plain)
        mix = ", ".join(f"{kind} {share:.0%}" for kind, share in MIX.items())
        about = (f"{urls} URLs of one synset via serve_sample.py (own process, --latency "
                 f"{LATENCY:g}); failing mix: {mix}\n"
                 f"both clients: {CONCURRENCY} in flight, timeout {TIMEOUT} s, no retries; "
                 f"ours --per-host {CONCURRENCY}; img2dataset: {PROCESSES} processes, "
                 f"{shard} URLs per shard (re-encoding every image: its default)")
        yield Setup("mirror", mirror.process.pid, wnid, ours, plain,
                    ["--concurrency", str(CONCURRENCY), "--per-host", str(CONCURRENCY),
                     "--timeout", str(TIMEOUT), "--retries", "0"], about=about,
                    urls=urls, shard_size=shard)


@contextlib.contextmanager
def hosts_scenario(args: argparse.Namespace, workdir: Path, sample: Path, wnid: str,
                   quiet: Quiet) -> Iterator[Setup]:
    urls = scenario_urls(args, "hosts")
    shard = shard_size(args, "hosts", urls)
    with open(workdir / "web.log", "wb") as log, serve_web_process(
            sample, args.hosts, mix=HOST_MIX, latency=LATENCY,
            max_seconds=server_budget(args, quiet), trickle_every=TRICKLE_EVERY,
            stderr=log) as web_:
        ours = workdir / "urls-hosts.txt"
        expected = build_web_url_list(sample, web_, ours, wnids=[wnid], per_synset=urls,
                                      per_path_mix=MIX, malformed=0)
        literal = workdir / "urls-hosts-ip.txt"
        build_web_url_list(sample, web_, literal, wnids=[wnid], per_synset=urls,
                           per_path_mix=MIX, malformed=0, ip_literal=True)
        ids = [line.split("\t", 1)[0] for line in ours.read_text().splitlines()]
        if ids != [line.split("\t", 1)[0] for line in literal.read_text().splitlines()]:
            sys.exit("the hostname and IP-literal lists differ in their ids")
        plain = workdir / "urls-hosts-img2dataset.txt"
        write_plain(literal, plain)
        resolve = [arg for item in web_.resolve_args() for arg in ("--resolve", item)]
        netlocs = {f"{netloc}:{web_.port}" for host in web_.hosts
                   if host.behaviour == "placeholder" for netloc in (host.name, host.address)}
        yield Setup("hosts", web_.process.pid, wnid, ours, plain, resolve,
                    placeholders=web_.placeholder_digests(), placeholder_hosts=netlocs,
                    about=hosts_about(args, web_, ours, expected, urls, shard), urls=urls,
                    shard_size=shard)
    stats = web_.final_stats or {}
    drops = sum(entry.get("syn_drops", 0) for entry in stats.values())
    print(f"  (serve_web.py stopped; blackhole SYN drops over all runs: {drops})")


def hosts_about(args: argparse.Namespace, web_: WebLayout, urls: Path,
                expected: dict[str, str], n_urls: int, shard: int) -> str:
    hosts = Counter(host.behaviour for host in web_.hosts)
    per_host: Counter[str] = Counter()
    for line in urls.read_text(encoding="utf-8").splitlines():
        per_host[line.split("://", 1)[1].split(":", 1)[0]] += 1
    behaviour_urls: Counter[str] = Counter()
    for name, count in per_host.items():
        behaviour_urls[web_.host(name).behaviour] += count
    biggest = ", ".join(f"{count}" for _, count in per_host.most_common(5))
    mix = ", ".join(f"{kind} {share:.0%}" for kind, share in MIX.items())
    return (
        f"{n_urls} URLs of one synset over {len(web_.hosts)} hosts of serve_web.py (own "
        f"process, --latency {LATENCY:g}, trickle 1 byte / {TRICKLE_EVERY:g} s), Zipf-spread\n"
        "hosts: " + ", ".join(f"{b} {n}" for b, n in hosts.most_common()) + "\n"
        "URLs by host behaviour: "
        + ", ".join(f"{b} {n}" for b, n in behaviour_urls.most_common())
        + f"; biggest hosts {biggest} URLs\n"
        f"per-path failing mix on alive hosts: {mix}\n"
        "what a correct client records: "
        + ", ".join(f"{o} {n}" for o, n in Counter(expected.values()).most_common()) + "\n"
        f"ours: default options, hostname URLs + {len(web_.resolve_args())} --resolve; "
        f"img2dataset: IP-literal URLs, {CONCURRENCY} threads, timeout {TIMEOUT} s, no retries, "
        f"{PROCESSES} processes, {shard} URLs per shard")


# --------------------------------------------------------------------------- the world

# Run as `sh -c NAMESPACE_SCRIPT sh RESOLV NAME ADDRESS ARGV...` under `unshare -m` (a private
# mount namespace: the bind mount is seen by this command alone). The command runs only if
# NAME resolves to ADDRESS through the system resolver there, i.e. the fake DNS answers.
NAMESPACE_SCRIPT = f"""\
mount --bind "$1" /etc/resolv.conf || exit {GUARD_EXIT}
getent ahostsv4 "$2" | awk -v want="$3" '$1 == want {{ found = 1 }} END {{ exit !found }}' || {{
    echo "bench_gather: $2 does not resolve to $3 in this namespace; not run" >&2
    exit {GUARD_EXIT}
}}
shift 3
exec "$@"
"""

# Inside the namespace: what glibc (img2dataset's getaddrinfo) and c-ares (ours: aiodns with
# no servers given reads /etc/resolv.conf) make of a name.
RESOLVER_PROBE = """
import asyncio, json, socket, sys
import aiodns
async def main():
    resolver = aiodns.DNSResolver()
    answer = await resolver.getaddrinfo(sys.argv[1], socket.AF_INET)
    return list(resolver.nameservers), sorted({node.addr[0].decode() for node in answer.nodes})
servers, c_ares = asyncio.run(main())
glibc = sorted({info[4][0] for info in socket.getaddrinfo(sys.argv[1], 80, socket.AF_INET)})
print(json.dumps({"servers": servers, "c_ares": c_ares, "glibc": glibc}))
"""


def dns_address(wanted: str) -> str:
    """`wanted`, or the next 127.0.0.x whose port 53 (UDP and TCP) is free: another session's
    world may hold 127.0.0.53."""
    first = int(wanted.rsplit(".", 1)[1])
    for last in [first, *range(first + 1, first + 11)]:
        candidate = f"{wanted.rsplit('.', 1)[0]}.{last}"
        try:
            for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                with socket.socket(socket.AF_INET, kind) as probe:
                    if kind == socket.SOCK_STREAM:  # as fake_dns.py binds them
                        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    probe.bind((candidate, 53))
        except OSError:
            continue
        if candidate != wanted:
            print(f"  ({wanted}:53 is taken: the world's DNS serves on {candidate}:53)")
        return candidate
    sys.exit(f"no free port 53 on {wanted} or the 10 addresses after it")


def namespace_wrapper(resolv: Path, name: str, address: str) -> list[str]:
    """The argv prefix that runs a command in a mount namespace of its own whose
    /etc/resolv.conf is `resolv`, once `name` resolves there to `address`."""
    unshare = shutil.which("unshare")  # absolute: benchlib's launcher does not search PATH
    assert unshare is not None
    return [unshare, "-m", "sh", "-c", NAMESPACE_SCRIPT, "sh", str(resolv), name, address]


def check_world_dns(world: WorldProcess, wrapper: list[str], dns_host: str) -> str:
    """Abort unless, in the clients' kind of namespace, GUARD_NAME resolves to its world
    address through glibc and c-ares, c-ares reads the namespace's resolv.conf, and the fake
    DNS counted the queries. A client run outside the namespace would send the fake names to
    the machine's own resolver, which this benchmark must never do."""
    want = world.host(GUARD_NAME).address
    before = world.dns_stats()["by_name"].get(GUARD_NAME, 0)
    probe = subprocess.run([*wrapper, sys.executable, "-c", RESOLVER_PROBE, GUARD_NAME],
                           capture_output=True, text=True, timeout=60, cwd=REPO)
    after = world.dns_stats()["by_name"].get(GUARD_NAME, 0)
    try:
        found = json.loads(probe.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        found = {}
    problems = []
    if probe.returncode:
        problems.append(f"the probe failed ({probe.returncode}): {probe.stderr.strip()[-400:]}")
    if found.get("servers") != [dns_host]:
        problems.append(f"c-ares reads nameservers {found.get('servers')}, not [{dns_host}]")
    for resolver in ("c_ares", "glibc"):
        if found.get(resolver) != [want]:
            problems.append(f"{resolver} gives {found.get(resolver)} for {GUARD_NAME}, not "
                            f"[{want}]")
    if after <= before:
        problems.append(f"the fake DNS saw no query for {GUARD_NAME} ({before} -> {after})")
    if problems:
        sys.exit("ABORT: the world's DNS is not what the clients would use: "
                 + "; ".join(problems))
    return (f"checked: in the namespace {GUARD_NAME} -> {want} via glibc and c-ares "
            f"(nameservers {found['servers']}), the fake DNS counted {after - before} "
            "queries for it")


@contextlib.contextmanager
def world_scenario(args: argparse.Namespace, workdir: Path, quiet: Quiet) -> Iterator[Setup]:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        sys.exit("the world scenario needs root and unshare(1): port 53 and a mount namespace")
    urls = scenario_urls(args, "world")
    shard = shard_size(args, "world", urls)
    sample = workdir / "sample-world"
    make_sample(sample, classes=WORLD_SAMPLE["classes"], per_class=WORLD_SAMPLE["per_class"],
                workers=2)
    dns_host = dns_address(args.dns_address)
    with open(workdir / "world.log", "wb") as log, serve_world_process(
            sample, workdir / "world", n_urls=urls, dns=f"{dns_host}:53",
            max_seconds=server_budget(args, quiet), stderr=log) as world:
        resolv = workdir / "resolv-world.conf"
        resolv.write_text(RESOLV_CONF.format(address=dns_host), encoding="ascii")
        guard = world.host(GUARD_NAME).address
        assert guard is not None
        wrapper = namespace_wrapper(resolv, GUARD_NAME, guard)
        checked = check_world_dns(world, wrapper, dns_host)
        lines = world.urls.read_text(encoding="utf-8").splitlines()
        id_of_url = {url: image_id for image_id, url in (line.split("\t", 1) for line in lines)}
        wnids = sorted({image_id.rsplit("_", 1)[0] for image_id in id_of_url.values()})
        wnids_file = workdir / "world-wnids.txt"
        wnids_file.write_text("".join(f"{wnid}\n" for wnid in wnids), encoding="ascii")
        plain = workdir / "urls-world-img2dataset.txt"
        write_plain(world.urls, plain)
        summary = world.summary
        about = world_about(summary, dns_host, len(wnids), shard, checked)
        yield Setup(
            "world", world.process.pid, "", world.urls, plain, [], about=about, urls=urls,
            shard_size=shard, select=["--wnids-file", str(wnids_file)], wrapper=wrapper,
            i2d_flags=[], i2d_idle=I2D_IDLE, expected=world.expected(), id_of_url=id_of_url,
            placeholders=world.placeholder_digests(),
            dns_queries=lambda: int(world.dns_stats(timeout=30)["queries"]))
    dns = (world.final or {}).get("dns") or {}
    print(f"  (the world stopped; its DNS over all runs: {dns.get('queries', '?')} queries, "
          f"{dns.get('dropped', '?')} dropped)")


def world_about(summary: dict[str, object], dns_host: str, synsets: int, shard: int,
                checked: str) -> str:
    def counts(key: str) -> str:
        table = summary[key]
        assert isinstance(table, dict)
        return ", ".join(f"{k} {v}" for k, v in sorted(table.items(), key=lambda kv: -kv[1]))

    return (
        f"{summary['urls']} URLs of {synsets} synsets over {summary['hosts']} hosts of "
        f"serve_web.py's real world (own process; DNS: fake_dns.py on {dns_host}:53, in the "
        "same process)\n"
        f"hosts: {counts('hosts_by_behaviour')}\n"
        f"URLs by host behaviour: {counts('urls_by_behaviour')} ({summary['https_urls']} https "
        "to a closed port)\n"
        f"what a correct client records: {counts('outcomes')}\n"
        f"both clients use the system resolver, in a private mount namespace whose "
        f"/etc/resolv.conf says `nameserver {dns_host}`, `options timeout:5 attempts:2`; "
        f"{checked}; each command checks again before it starts\n"
        f"ours: default options, --wnids-file ({synsets} synsets); img2dataset: its defaults "
        f"(timeout 10 s, retries 0, re-encoding every image), {PROCESSES} processes x "
        f"{CONCURRENCY} threads, {shard} URLs per shard (one per process), --resize_mode no, "
        f"--output_format files; it never ends, so it is stopped after {I2D_IDLE:g} s without "
        "a new file; both compared up to their last image")


# --------------------------------------------------------------------------- the two clients

@dataclass
class ClientResult:
    name: str
    run: Run
    urls: int
    ok: int  # images the client kept, placeholders included
    outcomes: Counter[str]
    placeholders: int = 0  # kept images whose bytes are a placeholder host's picture
    url_seconds: list[float] = field(default_factory=list)
    note: str = ""
    unexpected: int = 0  # world: kept images of URLs that should give neither (not good)
    last_image: float | None = None  # world: seconds from the start to the last image kept
    stopped: str = ""  # world: why img2dataset was stopped ("" when it ended by itself)

    @property
    def good(self) -> int:
        return self.ok - self.placeholders - self.unexpected

    @property
    def rate_seconds(self) -> float:
        """The seconds good images/s is taken over: the whole command, or (world) up to the
        last image kept."""
        return self.run.seconds if self.last_image is None else self.last_image

    @property
    def good_per_second(self) -> float:
        return self.good / max(self.rate_seconds, 1e-9)


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
    all are deleted after each scenario, and leftovers found at start-up are deleted; before
    more timed runs, the deletion is waited out.
    """
    if not runs_dir.exists():
        return
    shutil.rmtree(runs_dir)
    os.sync()
    if settle:
        print(f"deleted old outputs; waiting {INODE_SETTLE_SECONDS} s for ext4 to allow "
              "reuse of their inodes ...", flush=True)
        time.sleep(INODE_SETTLE_SECONDS)


def run_ours(setup: Setup, out: Path, log: Path, timeout: float) -> ClientResult:
    """`pipeline gather` from an empty output folder (a journal left over would resume)."""
    fresh_output(out)
    select = setup.select or ["--wnid", setup.wnid]
    argv = [*setup.wrapper, sys.executable, "-m", "pipeline", "-q", "gather", "--urls",
            str(setup.ours_list), *select, "--out", str(out), *setup.ours_args]
    queries = setup.dns_queries() if setup.dns_queries else 0
    started = time.time()
    run = benchlib.run_measured(argv, log, cwd=REPO, helper_pid=setup.helper_pid,
                                timeout=timeout)
    lines = [json.loads(line) for line in (out / "gather.jsonl").open(encoding="utf-8")]
    # The journal is append-only and the last record of an id is its outcome: gather journals
    # an id again when it takes an image back (a mass placeholder found later).
    last = {record["id"]: record for record in lines}
    records = list(last.values())
    outcomes = Counter(record["outcome"] for record in records)
    placeholders = sum(record["outcome"] == "ok" and record["sha256"] in setup.placeholders
                       for record in records)
    if setup.expected:
        return world_ours(setup, out, run, lines, records, started, queries)
    notes = []
    if len(lines) > len(records):
        notes.append(f"{len(lines) - len(records)} journal lines superseded by a later record "
                     "of the same id")
    if setup.placeholders:
        on_disk = count_placeholder_files(out / setup.wnid, setup.placeholders)
        notes.append(f"placeholder pictures in {setup.wnid}/ on disk: {on_disk}")
    # `seconds` of the first record of an id (a take-back record says 0.0).
    seconds = {record["id"]: record["seconds"] for record in reversed(lines)}
    return ClientResult("pipeline gather", run, len(records), outcomes["ok"], outcomes,
                        placeholders, list(seconds.values()), "; ".join(notes))


def world_ours(setup: Setup, out: Path, run: Run, lines: list[dict[str, Any]],
               records: list[dict[str, Any]], started: float, queries: int) -> ClientResult:
    """Ours in the world: kept images sorted by what their URL should give; the rate up to the
    last image kept (its journal record's `time`)."""
    outcomes = Counter(str(record["outcome"]) for record in records)
    kept = [record for record in records if record["outcome"] == "ok"]
    by_expected = Counter(setup.expected.get(str(record["id"]), "unknown") for record in kept)
    times = [float(record["time"]) for record in kept]
    digests = sum(record["sha256"] in setup.placeholders for record in kept)
    notes = ["kept by expected outcome: "
             + ", ".join(f"{name} {count}" for name, count in by_expected.most_common()),
             f"placeholder pictures (sha256) among them: {digests}",
             f"DNS queries: {setup.dns_queries() - queries}" if setup.dns_queries else "",
             kept_over_time(times, started)]
    if len(lines) > len(records):
        notes.append(f"{len(lines) - len(records)} journal lines superseded by a later record "
                     "of the same id")
    seconds = {record["id"]: record["seconds"] for record in reversed(lines)}
    return ClientResult(
        "pipeline gather", run, len(records), len(kept), outcomes, by_expected["placeholder"],
        [float(value) for value in seconds.values()],
        "; ".join(filter(None, notes)),
        unexpected=len(kept) - by_expected["ok"] - by_expected["placeholder"],
        last_image=max(times) - started if times else 0.0)


PERCENTS = (25, 50, 75, 90, 99)


def kept_over_time(times: list[float], started: float) -> str:
    """When the kept images landed: a rate up to the last image is set by the slowest one, so
    this tells a slow tail from a slow rate."""
    if not times:
        return ""
    ordered = sorted(time_ - started for time_ in times)
    at = [ordered[min(len(ordered) - 1, len(ordered) * share // 100)] for share in PERCENTS]
    marks = ", ".join(f"{share}% at {when:.1f} s" for share, when in zip(PERCENTS, at, strict=True))
    return f"kept images by time: {marks}, last at {ordered[-1]:.1f} s"


def count_placeholder_files(folder: Path, digests: set[str]) -> int:
    """Image files under `folder` whose bytes are one of the placeholder pictures."""
    return sum(hashlib.sha256(path.read_bytes()).hexdigest() in digests
               for path in folder.rglob("*")
               if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())


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


def run_img2dataset(exe: Path, setup: Setup, out: Path, shard_size: int, log: Path,
                    timeout: float) -> ClientResult:
    """The anchor with the issue's flags (world: its defaults); its per-shard *_stats.json
    give the counts (world: its per-image .json, as it is stopped before writing them)."""
    fresh_output(out)
    flags = (["--timeout", str(TIMEOUT), "--retries", "0"] if setup.i2d_flags is None
             else setup.i2d_flags)
    argv = [*setup.wrapper, str(exe), "--url_list", str(setup.plain_list), "--input_format",
            "txt", "--output_folder", str(out), "--processes_count", str(PROCESSES),
            "--thread_count", str(CONCURRENCY), *flags, "--resize_mode", "no",
            "--output_format", "files", "--number_sample_per_shard", str(shard_size)]
    # albumentations (imported by img2dataset) would look up pypi.org at import.
    env = {**os.environ, "WANDB_MODE": "disabled", "WANDB_SILENT": "true",
           "NO_ALBUMENTATIONS_UPDATE": "1"}
    if setup.i2d_idle is not None:
        queries = setup.dns_queries() if setup.dns_queries else 0
        run, started, stopped = run_until_idle(argv, log, out, idle=setup.i2d_idle,
                                               limit=timeout, env=env,
                                               helper_pid=setup.helper_pid)
        result = world_img2dataset(setup, out, run, started, stopped)
        if setup.dns_queries:
            result.note += f"; DNS queries: {setup.dns_queries() - queries}"
        return result
    run = benchlib.run_measured(argv, log, cwd=REPO, env=env, helper_pid=setup.helper_pid,
                                timeout=timeout)
    shards = [json.loads(path.read_text()) for path in sorted(out.glob("*_stats.json"))]
    outcomes: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for shard in shards:
        outcomes["success"] += shard["successes"]
        outcomes["failed_to_download"] += shard["failed_to_download"]
        outcomes["failed_to_resize"] += shard["failed_to_resize"]
        errors.update({_short_error(key): count
                       for key, count in shard.get("status_dict", {}).items()
                       if key != "success"})
    placeholders = count_i2d_placeholders(out, setup.placeholder_hosts)
    durations = [shard["duration"] for shard in shards]
    note = (f"{len(shards)} shard(s) of <= {shard_size} URLs, shard seconds "
            f"{min(durations):.1f}..{max(durations):.1f}" if durations else "no shard stats")
    if errors:
        note += "; errors: " + ", ".join(f"{key} {n}" for key, n in errors.most_common(6))
    return ClientResult(f"img2dataset {I2D_VERSION}", run, sum(s["count"] for s in shards),
                        outcomes["success"], outcomes, placeholders, [], note)


def world_img2dataset(setup: Setup, out: Path, run: Run, started: float,
                      stopped: str) -> ClientResult:
    """img2dataset in the world, from the `<key>.json` beside each image it kept (its shard
    stats are written only at a shard's end, which never comes): kept images by what their
    URL should give; the rate up to its last image file's mtime."""
    by_expected: Counter[str] = Counter()
    last = started
    for shard in sorted(path for path in out.iterdir() if path.is_dir() and path.name != "_tmp"):
        for entry in os.scandir(shard):
            if Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
                last = max(last, entry.stat().st_mtime)
            elif entry.name.endswith(".json"):
                meta = json.loads(Path(entry.path).read_text(encoding="utf-8"))
                if meta.get("status") == "success":
                    image_id = setup.id_of_url.get(str(meta.get("url")), "")
                    by_expected[setup.expected.get(image_id, "unknown")] += 1
    kept = sum(by_expected.values())
    outcomes = Counter({f"success (expected {name})": count
                        for name, count in by_expected.items()})
    note = (f"{stopped}; its failures are not counted (no shard stats: it was stopped "
            "first)" if stopped else "ended by itself")
    return ClientResult(f"img2dataset {I2D_VERSION}", run, setup.urls, kept, outcomes,
                        by_expected["placeholder"], [], note,
                        unexpected=kept - by_expected["ok"] - by_expected["placeholder"],
                        last_image=last - started, stopped=stopped)


# A launcher for a command that may never end (img2dataset in the world): as benchlib's, but
# the command runs in a process group of its own (so it can be stopped without the launcher)
# and the launcher is a child subreaper: the command's worker processes, orphaned when it is
# killed, are reaped here, so their CPU and peak RSS still count (RUSAGE_CHILDREN) and none
# of it looks like other people's load. It writes the command's pid first (sys.argv[2]).
REAPER = """
import ctypes, json, os, resource, sys, time
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
epoch, start = time.time(), time.perf_counter()
pid = os.fork()
if pid == 0:
    os.setpgid(0, 0)
    os.execvp(sys.argv[3], sys.argv[3:])
try:
    os.setpgid(pid, pid)
except OSError:
    pass  # the child did it already (and exec'd)
with open(sys.argv[2], "w") as handle:
    handle.write(str(pid))
code, seconds = None, None
while True:
    try:
        done, status = os.wait()
    except ChildProcessError:
        break
    if done == pid:
        code, seconds = os.waitstatus_to_exitcode(status), time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(sys.argv[1], "w") as out:
    json.dump({"epoch": epoch, "seconds": seconds, "maxrss_kb": usage.ru_maxrss,
               "cpu": usage.ru_utime + usage.ru_stime, "code": code}, out)
"""


def run_until_idle(argv: list[str], log: Path, watch: Path, *, idle: float, limit: float,
                   env: dict[str, str], helper_pid: int) -> tuple[Run, float, str]:
    """Run `argv` (through REAPER) until it ends, or no new file appeared under `watch` (its
    folder or a subfolder's mtime) for `idle` seconds (I2D_STARTUP more before the first), or
    `limit` seconds passed; then SIGTERM its process group (SIGKILL after a grace).

    Returns the figures (as benchlib.run_measured's; `seconds` up to the command's exit), its
    start (epoch seconds) and why it was stopped ("" if it ended by itself).
    """
    figures, pid_file = log.with_suffix(".figures.json"), log.with_suffix(".pid")
    figures.unlink(missing_ok=True)
    pid_file.unlink(missing_ok=True)
    helper_cpu = benchlib.cpu_seconds_of(helper_pid)
    load = benchlib.OtherLoad(helper_pid)
    wall = time.perf_counter()
    with open(log, "wb") as output:
        output.write(f"$ {' '.join(argv)}\n".encode())
        output.flush()
        launcher = subprocess.Popen(
            [sys.executable, "-S", "-c", REAPER, str(figures), str(pid_file), *argv], cwd=REPO,
            stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        sampler = benchlib.TreeSampler(launcher.pid)
        sampler.start()
        stopped = ""
        try:
            stopped = _watch_files(launcher, watch, idle, limit)
        finally:
            if launcher.poll() is None:
                _stop_command(launcher, pid_file)
            sampler.stop()
    other_load = load.share(time.perf_counter() - wall)
    result = json.loads(figures.read_text()) if figures.exists() else {"code": -1}
    if result.get("seconds") is None or (not stopped and result["code"] != 0):
        tail = log.read_text(errors="replace").splitlines()[-15:]
        sys.exit(f"command failed ({result['code']}): {' '.join(argv)}\n" + "\n".join(tail))
    run = Run(result["seconds"], result["cpu"], result["maxrss_kb"] / 1024,
              sampler.peak_kb / 1024, other_load,
              benchlib.cpu_seconds_of(helper_pid) - helper_cpu)
    return run, float(result["epoch"]), stopped


def _watch_files(launcher: subprocess.Popen[bytes], watch: Path, idle: float,
                 limit: float) -> str:
    """Poll until the launcher ends ("") or it is time to stop it (why)."""
    start = last_change = time.monotonic()
    last_change += I2D_STARTUP
    seen: tuple[tuple[str, int], ...] = ()
    while launcher.poll() is None:
        now = time.monotonic()
        state = _folder_state(watch)
        if state != seen:
            seen, last_change = state, max(last_change, now) if not seen else now
        if now - last_change >= idle:
            return f"stopped after {now - start:.0f} s: no new file for {idle:g} s"
        if now - start >= limit:
            return f"stopped at the time limit ({limit:g} s), still writing"
        time.sleep(1.0)
    return ""


def _folder_state(watch: Path) -> tuple[tuple[str, int], ...]:
    """The mtimes of `watch` and its subfolders: a new file changes its folder's."""
    try:
        folders = [watch, *(Path(entry.path) for entry in os.scandir(watch) if entry.is_dir())]
        return tuple((folder.name, folder.stat().st_mtime_ns) for folder in folders)
    except OSError:
        return ()


def _stop_command(launcher: subprocess.Popen[bytes], pid_file: Path) -> None:
    """SIGTERM the command's process group, SIGKILL what is left after 10 s; the launcher
    then reaps them all and exits. If it does not, its whole tree is killed."""
    try:
        group = int(pid_file.read_text())
    except (OSError, ValueError):
        group = 0
    for signum, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 20.0)):
        if group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signum)
        with contextlib.suppress(subprocess.TimeoutExpired):
            launcher.wait(timeout=grace)
            return
    for pid in benchlib.process_tree(launcher.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    launcher.wait()


def count_i2d_placeholders(out: Path, netlocs: set[str]) -> int:
    """img2dataset's successes from placeholder hosts, from the `<key>.json` it writes beside
    each image. Not by sha256: it re-encodes every image (cv2, even with --resize_mode no), so
    its files never have the placeholder's bytes."""
    if not netlocs:
        return 0
    kept = 0
    for path in out.rglob("*.json"):
        if path.name.endswith("_stats.json"):
            continue
        meta = json.loads(path.read_text(encoding="utf-8"))
        url = str(meta.get("url") or "")
        kept += (meta.get("status") == "success"
                 and url.split("://", 1)[-1].split("/", 1)[0] in netlocs)
    return kept


def _short_error(message: str) -> str:
    """img2dataset's status keys are whole exception texts: keep their gist."""
    message = " ".join(message.split())
    return message if len(message) <= 48 else message[:45] + "..."


# --------------------------------------------------------------------------- quiet pairs

@dataclass
class Pair:
    """One try: both clients back to back (`order`), or none when the box never calmed down."""

    number: int
    order: list[str]
    results: dict[str, ClientResult]
    other_load: float  # the larger of the two commands' other load (or the last quiet check)
    kept: bool
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if "ours" not in self.results or "img2dataset" not in self.results:
            return None
        return (self.results["ours"].good_per_second
                / max(self.results["img2dataset"].good_per_second, 1e-9))


@dataclass
class Scenario:
    setup: Setup
    pairs: list[Pair]
    wanted: int
    failure: str = ""  # why there is no result beyond too few quiet pairs (a time limit)

    @property
    def kept(self) -> list[Pair]:
        return [pair for pair in self.pairs if pair.kept]

    @property
    def complete(self) -> bool:
        return not self.failure and len(self.kept) >= self.wanted

    def median_ratio(self) -> float | None:
        ratios = [pair.ratio for pair in self.kept if pair.ratio is not None]
        return statistics.median(ratios) if ratios else None

    def median_pair(self) -> Pair | None:
        """The kept pair at the median: of its ratio, or (ours alone) of ours' good images/s;
        the lower middle one for an even count."""
        def key(pair: Pair) -> float:
            ratio = pair.ratio
            return ratio if ratio is not None else pair.results["ours"].good_per_second
        kept = sorted(self.kept, key=key)
        return kept[(len(kept) - 1) // 2] if kept else None


def pair_line(pair: Pair, max_other: float) -> str:
    head = f"  pair {pair.number} ({' then '.join(pair.order)}): "
    if not pair.results:
        return head + f"DISCARDED, not run: {pair.note}"
    runs = ", ".join(f"{client} {result.good_per_second:.0f} good img/s "
                     + (f"up to its last image at {result.last_image:.1f} s of "
                        if result.last_image is not None else "in ")
                     + f"{result.run.seconds:.1f} s (other load {result.run.other_load:.0%})"
                     for client, result in pair.results.items())
    ratio = f" -> {pair.ratio:.2f}x" if pair.ratio is not None else ""
    verdict_ = ("kept" if pair.kept else
                pair.note or f"DISCARDED (other load {pair.other_load:.0%} > {max_other:.0%})")
    return head + runs + ratio + f"; {verdict_}"


def bench_pairs(args: argparse.Namespace, setup: Setup, exe: Path | None, quiet: Quiet,
                runs_dir: Path, workdir: Path) -> Scenario:
    """Pairs until `--repeat` quiet ones are had or `--max-tries` are spent; who goes first
    alternates with every try so neither always meets a warmer (or more tired) server."""
    scenario = Scenario(setup, [], args.repeat)
    clients = ["ours"] if exe is None else ["ours", "img2dataset"]
    for number in range(1, args.max_tries + 1):
        if len(scenario.kept) >= args.repeat:
            break
        order = clients if number % 2 else clients[::-1]
        share = benchlib.wait_for_quiet(quiet, setup.helper_pid)
        if share > quiet.max_other:
            pair = Pair(number, order, {}, share, False,
                        f"other load {share:.0%} > {quiet.max_other:.0%} after waiting "
                        f"{quiet.max_wait:g} s")
            scenario.pairs.append(pair)
            print(pair_line(pair, quiet.max_other), flush=True)
            continue
        results: dict[str, ClientResult] = {}
        for position, client in enumerate(order):
            if position:  # back to back, but not into a stranger's burst
                benchlib.wait_for_quiet(quiet, setup.helper_pid)
            out = runs_dir / f"{setup.name}-{number}-{client}"
            try:
                if client == "ours":
                    results[client] = run_ours(setup, out, workdir / f"ours-{setup.name}.log",
                                               args.run_timeout)
                else:
                    assert exe is not None
                    results[client] = run_img2dataset(
                        exe, setup, out, setup.shard_size,
                        workdir / f"img2dataset-{setup.name}.log", args.run_timeout)
            except CommandTimeout:
                scenario.failure = (f"{client} did not finish within {args.run_timeout:g} s "
                                    f"in pair {number} (killed; see its log in {workdir})")
                print(f"  pair {number}: {scenario.failure}", flush=True)
                return scenario
        load = max(result.run.other_load for result in results.values())
        pair = Pair(number, order, results, load, load <= quiet.max_other)
        scenario.pairs.append(pair)
        print(pair_line(pair, quiet.max_other), flush=True)
    return scenario


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
from pipeline.formats.urllist import select_urls
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

def client_table(results: list[ClientResult], good_expected: int = 0) -> str:
    """One row per client; with `good_expected` (world) also the share of the good images
    kept and the second of the last image kept (good img/s is taken up to it)."""
    world = bool(good_expected)
    rows = [["client", "URLs", "kept" if world else "ok", "placeholders kept", "good",
             *(["good kept"] if world else []), "seconds", *(["last image s"] if world else []),
             "good img/s", "p50 s/URL", "p95 s/URL", "CPU s", "max RSS MB", "peak PSS MB",
             "server CPU s", "other load"]]
    for result in results:
        times = result.url_seconds
        extra = ([f"{result.good / good_expected:.1%}"] if world else [])
        last = ([f"{result.last_image:.1f}" if result.last_image is not None else "n/a"]
                if world else [])
        rows.append([result.name, str(result.urls), str(result.ok), str(result.placeholders),
                     str(result.good), *extra, f"{result.run.seconds:.1f}", *last,
                     f"{result.good_per_second:.0f}",
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


def no_result(scenario: Scenario) -> str:
    """Why a scenario has no ratio to report ("" when it has one)."""
    if scenario.failure:
        return f"NO RESULT: {scenario.failure}"
    if scenario.complete:
        return ""
    loads = ", ".join(f"{pair.other_load:.0%}" for pair in scenario.pairs if not pair.kept)
    return (f"NO RESULT: only {len(scenario.kept)} of {scenario.wanted} quiet pairs wanted in "
            f"{len(scenario.pairs)} tries (other load of the discarded: {loads}); a ratio "
            "measured under foreign load is not a result, re-run on a quiet machine")


def report(scenario: Scenario) -> None:
    """The median pair's table and outcomes, and the median ratio (or why there is none)."""
    pair = scenario.median_pair()
    print()
    if pair is not None:
        chosen = [pair.results[client] for client in ("ours", "img2dataset")
                  if client in pair.results]
        print(f"the median pair (pair {pair.number}) of {len(scenario.kept)} quiet one(s):")
        print(client_table(chosen, scenario.setup.good_expected))
        print("outcomes:")
        print("\n".join(outcome_lines(chosen)))
        print("p50/p95 s/URL: ours from the journal's `seconds` (fetch only, checks and write "
              "excluded); img2dataset records no per-URL time (n/a). good = ok minus kept "
              "placeholders")
        if scenario.setup.expected:
            print(f"world: good = kept and expected ok (of {scenario.setup.good_expected}); "
                  "good img/s = good / seconds to the last image kept (ours: its journal "
                  "record's time; img2dataset: its last file's mtime); seconds = whole command "
                  "(img2dataset: until stopped); CPU s and memory over the whole command")
        ratio = scenario.median_ratio()
        if ratio is not None:
            ratios = ", ".join(f"{p.ratio:.2f}x" for p in scenario.kept if p.ratio is not None)
            print(f"ratio ours/img2dataset (good images/s): median of {len(scenario.kept)} quiet "
                  f"pair(s) = {ratio:.2f}x (pairs: {ratios}; target >= {TARGET_RATIO:g}x)")
    problem = no_result(scenario)
    if problem:
        print("!" * 78)
        print(f"!!! scenario {scenario.setup.name}: {problem}")
        print("!" * 78)


def summary_line(scenario: Scenario, args: argparse.Namespace) -> str:
    name = scenario.setup.name
    urls = scenario.setup.urls
    if name == "mirror":
        what = (f"{urls} URLs on one host (20% failing, 4% hang > {TIMEOUT} s, "
                f"{LATENCY * 1000:.0f} ms latency), both at the issue's flags")
    elif name == "hosts":
        what = (f"{urls} URLs over {args.hosts} hosts (real-web host mix, refusing for "
                f"DNS-dead, {LATENCY * 1000:.0f} ms latency), ours at default options")
    else:
        what = (f"{urls} URLs of the real world (~5,500 hosts, fake DNS as the system "
                "resolver), ours at default options, img2dataset at its defaults, one shard "
                "per process")
    head = f"summary {name}: {what}: "
    problem = no_result(scenario)
    if problem:
        return head + problem
    pair = scenario.median_pair()
    assert pair is not None
    ours = pair.results["ours"]
    short = ""
    if scenario.wanted < MIN_PAIRS:
        short = (f" [only {scenario.wanted} pair(s) asked for (--repeat): the reporting rule "
                 f"needs >= {MIN_PAIRS}, so this is not a result]")
    anchor = pair.results.get("img2dataset")
    ratio = scenario.median_ratio()
    if anchor is None or ratio is None:
        return (head + f"ours {ours.good_per_second:.0f} good img/s (median of "
                f"{len(scenario.kept)} quiet run(s); img2dataset skipped)" + short)
    figures = (f"ours {ours.good_per_second:.0f} vs img2dataset {anchor.good_per_second:.0f} "
               f"good img/s (median pair) = median of {len(scenario.kept)} quiet pairs "
               f"{ratio:.2f}x")
    if name == "mirror":
        return (head + figures + f" (target >= {TARGET_RATIO:g}x: "
                f"{verdict(ratio >= TARGET_RATIO)})" + short)
    if name == "world":
        return head + world_figures(scenario, ours, anchor, ratio) + short
    kept = [p.results["ours"].placeholders for p in scenario.kept]
    return (head + figures + f"; placeholders kept: ours {ours.placeholders}, img2dataset "
            f"{anchor.placeholders} (target >= {TARGET_RATIO:g}x with no placeholder kept: "
            f"{verdict(ratio >= TARGET_RATIO and max(kept) == 0)})" + short)


def world_figures(scenario: Scenario, ours: ClientResult, anchor: ClientResult,
                  ratio: float) -> str:
    """The world's summary: the ratio up to each one's last image, the share of the good
    images kept and the placeholders kept (the target's worst over the quiet pairs)."""
    wanted = scenario.setup.good_expected
    shares = [p.results["ours"].good / wanted for p in scenario.kept]
    kept = [p.results["ours"].placeholders for p in scenario.kept]
    met = ratio >= TARGET_RATIO and min(shares) >= TARGET_GOOD_SHARE and max(kept) == 0
    return (f"ours {ours.good_per_second:.0f} vs img2dataset {anchor.good_per_second:.0f} good "
            f"img/s up to each one's last image (median pair; ours' whole run "
            f"{ours.run.seconds:.0f} s, img2dataset never ends) = median of "
            f"{len(scenario.kept)} quiet pairs {ratio:.2f}x; good images kept: ours "
            f"{ours.good}/{wanted} ({ours.good / wanted:.1%}, lowest pair {min(shares):.1%}), "
            f"img2dataset {anchor.good} ({anchor.good / wanted:.1%}); placeholders kept: ours "
            f"{ours.placeholders} (most in a pair {max(kept)}), img2dataset "
            f"{anchor.placeholders} (target >= {TARGET_RATIO:g}x img2dataset's good img/s, >= "
            f"{TARGET_GOOD_SHARE:.0%} of the good images kept, no placeholder kept: "
            f"{verdict(met)})")


def filter_summary(flt: FilterResult) -> str:
    filter_ok = (flt.lines_per_second >= FILTER_TARGET_LPS
                 and flt.run.max_rss_mb < FILTER_TARGET_MB)
    return (f"summary filter: URL filter {flt.lines:,} lines at "
            f"{flt.lines_per_second / 1e6:.2f}M lines/s, max RSS {flt.run.max_rss_mb:.0f} MB "
            f"(targets >= 1M lines/s, < {FILTER_TARGET_MB} MB: {verdict(filter_ok)})")


def header(args: argparse.Namespace, workdir: Path) -> str:
    import aiohttp

    return (f"python {platform.python_version()}, aiohttp {aiohttp.__version__}; "
            f"{os.cpu_count()} cores; workdir {workdir}\n"
            f"reporting: median of {args.repeat} quiet back-to-back pair(s) per scenario; a "
            f"pair is discarded when other processes took > {args.max_other_load:.0%} of the "
            f"cores; at most {args.max_tries} tries; each command killed after "
            f"{args.run_timeout:g} s; seconds = whole command, start-up included")


# --------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--scenario", choices=("all", *SCENARIOS), default="all",
                        help="mirror (one host), hosts (real-web host mix), world (the real "
                             "world, with DNS), or all (default)")
    parser.add_argument("--urls", type=int, default=None,
                        help=f"URLs in the list ({URLS}; world: {WORLD_URLS})")
    parser.add_argument("--hosts", type=int, default=HOSTS,
                        help=f"simulated hosts in the hosts scenario ({HOSTS})")
    parser.add_argument("--dns-address", default=DNS_ADDRESS,
                        help=f"world: the fake DNS's address, port 53 ({DNS_ADDRESS}; the next "
                             "free 127.0.0.x if taken)")
    parser.add_argument("--workdir", type=Path,
                        default=Path(tempfile.gettempdir()) / "bench_gather",
                        help="sample, lists and outputs; the 10M-line list is cached here")
    parser.add_argument("--skip-img2dataset", action="store_true")
    parser.add_argument("--keep-runs", action="store_true",
                        help="leave the runs' output folders (journals, images) in WORKDIR/runs "
                             "for a look after the benchmark")
    parser.add_argument("--img2dataset-venv", type=Path, default=DEFAULT_I2D_VENV)
    parser.add_argument("--shard-size", type=int, default=None,
                        help="img2dataset --number_sample_per_shard (default: URLs / "
                             f"({SHARDS_PER_PROCESS} x processes), so every process has work to "
                             "the end, as its docs advise; its own default of 10000 would leave "
                             "one of two processes idle on 10,000 URLs; world: URLs / "
                             "processes, see the docstring)")
    parser.add_argument("--filter-lines", type=int, default=FILTER_LINES,
                        help="lines of the URL-list filter benchmark (0: skip it)")
    parser.add_argument("--repeat", type=int, default=REPEAT,
                        help=f"quiet back-to-back pairs wanted per scenario ({REPEAT}); the "
                             "median of their ratios is reported")
    parser.add_argument("--max-tries", type=int, default=None,
                        help="pairs tried per scenario before giving up (3 x --repeat)")
    benchlib.add_quiet_arguments(parser)
    parser.add_argument("--run-timeout", type=float, default=RUN_TIMEOUT,
                        help=f"seconds after which a command is killed ({RUN_TIMEOUT:g})")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.max_tries is None:
        args.max_tries = 3 * args.repeat
    if args.max_tries < args.repeat:
        parser.error("--max-tries must be at least --repeat")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # One run per workdir: a second one would delete the first one's outputs mid-run.
    lock = open(workdir / ".lock", "w")  # noqa: SIM115 - held until the process ends
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(f"another bench_gather.py is using {workdir}; wait for it or give --workdir")
    quiet = benchlib.quiet_from(args)
    names = SCENARIOS if args.scenario == "all" else (args.scenario,)
    print(header(args, workdir), flush=True)
    exe = None if args.skip_img2dataset else ensure_img2dataset(args.img2dataset_venv)
    runs_dir = workdir / "runs"
    clear_outputs(runs_dir, settle=True)
    sample = workdir / "sample"
    scenarios = []
    for index, name in enumerate(names):
        print(f"\n== scenario {name} ==", flush=True)
        if name == "world":
            context = world_scenario(args, workdir, quiet)
        else:
            # One distinct picture per URL, as on the real web: a picture served for many URLs
            # (even with other bytes) is a mass placeholder to gather, and it would drop it.
            wnid = make_sample(sample, classes=1, per_class=scenario_urls(args, name),
                               workers=2)[0]
            scenario_of = mirror_scenario if name == "mirror" else hosts_scenario
            context = scenario_of(args, workdir, sample, wnid, quiet)
        with context as setup:
            print(setup.about, flush=True)
            scenario = bench_pairs(args, setup, exe, quiet, runs_dir, workdir)
        report(scenario)
        if not args.keep_runs:
            clear_outputs(runs_dir, settle=index < len(names) - 1)
        scenarios.append(scenario)
    flt = None
    if args.filter_lines > 0:
        path, wnids = filter_list(workdir, args.filter_lines)
        benchlib.wait_for_quiet(quiet)
        flt = bench_filter(path, wnids, workdir / "filter.log")
        print()
        print(filter_table(flt))
        print(f"  median of {FILTER_REPEAT} fresh interpreters, warm page cache, "
              f"{path.stat().st_size / 2**20:.0f} MiB file; max RSS = largest of the runs")
        warning = benchlib.disturbed_warning(flt.run.other_load, quiet.max_other)
        if warning:
            print(warning)
    print()
    for scenario in scenarios:
        print(summary_line(scenario, args))
    if flt is not None:
        print(filter_summary(flt))


if __name__ == "__main__":
    main()

"""gather against a real aiohttp mirror with real faults (pipeline/testing/serve_sample.py)."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest

from pipeline.core.errors import InputError
from pipeline.core.images import decode_image
from pipeline.formats.journal import read_journal
from pipeline.formats.urllist import select_urls
from pipeline.stages.gather import GatherOptions, gather_synsets
from pipeline.testing import make_sample
from pipeline.testing.serve_sample import serve_in_process

# Every fault kind twice per synset (1/30 of 60 URLs each), the rest plain images.
EVERY_KIND = {kind: 2 / 60 for kind in make_sample.KINDS}
HANG_TIMEOUT = 3.0  # the slow/stall kinds cost this per attempt; shorter flakes under load


@pytest.fixture(scope="module")
def mirror(sample):
    with serve_in_process(sample, max_seconds=600) as handle:
        yield handle


def options(out: Path, sample: Path, **overrides) -> GatherOptions:
    """Test settings; a generous --timeout, so a loaded CI machine never looks like a dead host.

    Tests whose URLs hang (EVERY_KIND) pass `timeout=HANG_TIMEOUT` to stay quick.
    """
    placeholder = hashlib.sha256((sample / "placeholder.png").read_bytes()).hexdigest()
    values = {"out": out, "concurrency": 32, "per_host": 32, "timeout": 10.0, "retries": 1,
              "backoff": 0.05, "max_bytes": 2 * 2**20, "placeholder_digests": {placeholder}}
    return GatherOptions(**{**values, **overrides})


def url_list(sample: Path, mirror, path: Path, **kwargs) -> dict[str, str]:
    return make_sample.build_url_list(sample, mirror.base_url, path, **kwargs)


def wnids_of(sample: Path) -> list[str]:
    return sorted(p.name for p in (sample / "files").iterdir())


def kept_files(out: Path) -> dict[str, str]:
    """relative path -> sha256 of every image file gathered."""
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in out.rglob("*")
            if p.is_file() and p.name not in ("gather.jsonl", "placeholders.txt")}


@pytest.mark.slow
def test_every_fault_ends_with_its_outcome_and_only_good_images_are_kept(sample, mirror,
                                                                         tmp_path):
    wnids = wnids_of(sample)[:2]
    expected = url_list(sample, mirror, tmp_path / "urls.txt", wnids=wnids, mix=EVERY_KIND)
    out = tmp_path / "raw"
    settings = options(out, sample, timeout=HANG_TIMEOUT)
    report = gather_synsets(tmp_path / "urls.txt", wnids, settings)
    journal = read_journal(out / "gather.jsonl")
    assert set(journal) == set(expected)  # one record for every URL of those synsets
    outcomes = {image_id: record["outcome"] for image_id, record in journal.items()}
    # A duplicate pair may finish in either order: one of the two is kept, the other dropped.
    assert Counter(outcomes.values()) == Counter(expected.values())
    for image_id, outcome in expected.items():
        if outcome != "duplicate" and expected[image_id] != "ok":
            assert outcomes[image_id] == outcome, (image_id, journal[image_id])
    files = kept_files(out)
    assert len(files) == Counter(outcomes.values())["ok"]
    assert len(set(files.values())) == len(files)  # no two identical images in a synset
    for relative in files:
        decode_image(out / relative)  # every kept file is a real, decodable image
        assert relative.split("/")[0] in wnids
    assert not list(out.rglob("*.part"))
    retried = [r for r in journal.values() if r["url"].split("/")[3] in ("flaky", "throttle")]
    assert retried and all(r["outcome"] == "ok" and r["attempts"] == 2 for r in retried)
    assert sum(report.overall[w]["ok"] for w in wnids) == len(files)


@pytest.mark.slow
def test_second_run_fetches_nothing_new_and_retries_only_transient_failures(sample, mirror,
                                                                           tmp_path):
    wnids = wnids_of(sample)[:1]
    expected = url_list(sample, mirror, tmp_path / "urls.txt", wnids=wnids,
                        mix={"404": 0.1, "500": 0.05, "html": 0.05})
    out = tmp_path / "raw"
    gather_synsets(tmp_path / "urls.txt", wnids, options(out, sample))
    before = kept_files(out)
    paths_before = Counter(mirror.stats()["by_path"])
    report = gather_synsets(tmp_path / "urls.txt", wnids, options(out, sample))
    new_requests = Counter(mirror.stats()["by_path"]) - paths_before
    assert kept_files(out) == before
    transient = {i for i, outcome in expected.items() if outcome == "http_error"}
    assert report.skipped == len(expected) - len(transient)
    site_files = {p: n for p, n in new_requests.items()
                  if p.endswith(("/robots.txt", "/tdmrep.json"))}
    assert list(site_files.values()) == [1, 1]  # each asked once by the second run too
    assert {p.rsplit("/", 1)[-1].split(".")[0] for p in new_requests
            if p not in site_files} == transient


@pytest.mark.slow
def test_limit_gives_exactly_n_images_per_synset(sample, mirror, tmp_path):
    wnids = wnids_of(sample)[:2]
    url_list(sample, mirror, tmp_path / "urls.txt", wnids=wnids, mix=EVERY_KIND)
    out = tmp_path / "raw"
    gather_synsets(tmp_path / "urls.txt", wnids,
                   options(out, sample, limit=7, timeout=HANG_TIMEOUT))
    counts = Counter(path.split("/")[0] for path in kept_files(out))
    assert counts == {wnid: 7 for wnid in wnids}
    journal = read_journal(out / "gather.jsonl")
    assert Counter(r["class"] for r in journal.values() if r["outcome"] == "ok") == counts
    gather_synsets(tmp_path / "urls.txt", wnids,
                   options(out, sample, limit=9, timeout=HANG_TIMEOUT))  # resume, raise
    assert Counter(path.split("/")[0] for path in kept_files(out)) == {w: 9 for w in wnids}


def gather_command(urls: Path, out: Path, wnids: list[str], sample: Path) -> list[str]:
    command = [sys.executable, "-m", "pipeline", "-q", "gather", "--urls", str(urls),
               "--out", str(out), "--timeout", "10", "--retries", "1", "--concurrency", "8",
               "--placeholder", str(sample / "placeholder.png")]
    for wnid in wnids:
        command += ["--wnid", wnid]
    return command


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_same_images_as_an_uninterrupted_run(sample, tmp_path):
    wnids = wnids_of(sample)[:2]
    with serve_in_process(sample, latency=0.05, max_seconds=300) as slow_mirror:
        url_list(sample, slow_mirror, tmp_path / "urls.txt", wnids=wnids,
                 mix={"404": 0.1, "html": 0.05, "truncated": 0.05, "duplicate": 0.05})
        whole, killed = tmp_path / "whole", tmp_path / "killed"
        subprocess.run(gather_command(tmp_path / "urls.txt", whole, wnids, sample),
                       check=True, timeout=300)
        process = subprocess.Popen(gather_command(tmp_path / "urls.txt", killed, wnids, sample))
        journal = killed / "gather.jsonl"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (
                not journal.exists() or journal.read_text().count("\n") < 30):
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        interrupted = journal.read_text().count("\n")
        assert 30 <= interrupted < 120, "the kill must land mid-run"
        subprocess.run(gather_command(tmp_path / "urls.txt", killed, wnids, sample),
                       check=True, timeout=300)
    assert sorted(kept_files(killed).values()) == sorted(kept_files(whole).values())
    assert not list(killed.rglob("*.part"))
    records = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
    ok_ids = [r["id"] for r in records if r["outcome"] == "ok"]
    assert len(ok_ids) == len(set(ok_ids))  # nothing good was fetched twice


@pytest.mark.slow
def test_hostile_ids_cannot_leave_the_output_folder(sample, mirror, tmp_path):
    wnid = wnids_of(sample)[0]
    good = sorted((sample / "files" / wnid).glob("*.jpg"))
    evil = [f"{wnid}_../../../escaped", f"{wnid}_..", f"{wnid}_a/../../b", f"{wnid}_/etc/x"]
    lines = [f"{image_id}\t{mirror.base_url}/img/{wnid}/{good[k].name}"
             for k, image_id in enumerate(evil)]
    (tmp_path / "urls.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "deep" / "raw"
    gather_synsets(tmp_path / "urls.txt", [wnid], options(out, sample))
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix == ".jpg"]
    assert len(files) == len(evil)
    assert all(p.parent == out / wnid for p in files)


@pytest.mark.slow
def test_hyponyms_are_gathered_under_the_requested_synset(sample, mirror, tmp_path):
    # n90000101 "figure" -> n90000001 circle, n90000100 "polygon" -> square, triangle
    url_list(sample, mirror, tmp_path / "urls.txt", wnids=wnids_of(sample), mix={})
    out = tmp_path / "raw"
    gather_synsets(tmp_path / "urls.txt", ["n90000101"], options(out, sample),
                   is_a=sample / "wordnet.is_a.txt", with_hyponyms=True)
    folders = Counter(Path(p).parent.as_posix() for p in kept_files(out))
    assert folders == {f"n90000101/{child}": 60 for child in wnids_of(sample)}
    with pytest.raises(InputError, match="needs --is-a"):
        gather_synsets(tmp_path / "urls.txt", ["n90000101"], options(out, sample),
                       with_hyponyms=True)


@pytest.mark.slow
def test_unknown_wnid_and_missing_list_are_one_line_errors(sample, mirror, tmp_path):
    url_list(sample, mirror, tmp_path / "urls.txt", wnids=wnids_of(sample)[:1])
    with pytest.raises(InputError, match="n99999999"):
        gather_synsets(tmp_path / "urls.txt", ["n99999999"], options(tmp_path / "o", sample))
    for args, message in [(["--wnid", "n99999999"], "n99999999 has no URL"),
                          (["--wnid", "../etc"], "not a valid synset id")]:
        done = subprocess.run([sys.executable, "-m", "pipeline", "gather", "--urls",
                               str(tmp_path / "urls.txt"), "--out", str(tmp_path / "o"), *args],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and message in done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    done = subprocess.run([sys.executable, "-m", "pipeline", "gather", "--urls", "nope.txt",
                           "--wnid", "n1"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "nope.txt does not exist" in done.stderr


def test_help_documents_every_option():
    done = subprocess.run([sys.executable, "-m", "pipeline", "gather", "--help"],
                          capture_output=True, text=True, timeout=60)
    for option in ("--wnid", "--wnids-file", "--urls", "--out", "--limit", "--concurrency",
                   "--per-host", "--timeout", "--retries", "--max-bytes", "--words", "--is-a",
                   "--with-hyponyms", "--min-size", "--ignore-opt-out", "--placeholder"):
        assert option in done.stdout


@pytest.mark.slow
def test_memory_does_not_grow_with_list_length(tmp_path):
    def write_list(path: Path, lines: int) -> Path:
        with open(path, "w") as handle:
            for i in range(lines):
                wnid = "n00000001" if i < 200 else f"n{10_000_000 + i // 500:08d}"
                handle.write(f"{wnid}_{i}\thttp://example.invalid/{i}.jpg\n")
        return path

    peaks = []
    for lines, name in ((20_000, "short.txt"), (400_000, "long.txt")):
        path = write_list(tmp_path / name, lines)
        tracemalloc.start()
        assert len(select_urls(path, {"n00000001": "n00000001"}).entries) == 200
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    # 20x the lines, the same selection: the peak must not follow the list's length.
    assert peaks[1] < peaks[0] + 256 * 1024

"""What sites say about being crawled: robots.txt (RFC 9309) and TDMRep's tdmrep.json, parsed
on their own and honoured by gather against a real mirror that serves several host names."""

from collections import Counter
from pathlib import Path

import pytest

from pipeline.formats.journal import read_journal
from pipeline.stages.gather import GatherOptions, gather_synsets
from pipeline.stages.gather.consent import MAX_CRAWL_DELAY, SiteFiles, SitePolicy
from pipeline.testing.serve_sample import serve_in_thread

URL = "http://site.test/"


def policy(robots: str | None = None, tdmrep: str | None = None) -> SitePolicy:
    return SitePolicy.parse(SiteFiles(robots, tdmrep))


def test_the_group_for_our_token_overrides_the_star_group():
    rules = policy("User-agent: *\nDisallow: /\n\nUser-agent: pipeline\nDisallow: /private/\n")
    assert rules.refusal(URL + "photos/a.jpg") is None
    assert rules.refusal(URL + "private/a.jpg") == (
        "robots.txt: Disallow: /private/ (User-agent: pipeline)")
    other = policy("User-agent: otherbot\nDisallow: /\n\nUser-agent: *\nDisallow: /x/\n")
    assert other.refusal(URL + "a.jpg") is None
    assert other.refusal(URL + "x/a.jpg") == "robots.txt: Disallow: /x/ (User-agent: *)"


def test_the_longest_match_wins_and_allow_wins_a_tie():
    rules = policy("User-agent: *\nDisallow: /img/\nAllow: /img/public/\n"
                   "Disallow: /tie\nAllow: /tie\nDisallow: /*.png$\n")
    assert rules.refusal(URL + "img/a.jpg") is not None
    assert rules.refusal(URL + "img/public/a.jpg") is None
    assert rules.refusal(URL + "tie/a.jpg") is None
    assert rules.refusal(URL + "b.png") == "robots.txt: Disallow: /*.png$ (User-agent: *)"
    assert rules.refusal(URL + "b.png?size=2") is None  # "$" ends the pattern


def test_the_made_up_path_probe_is_asked_only_where_the_files_allow_it():
    assert policy().allows_made_up_path(URL + "img/a.jpg")  # no files: nothing to check
    folder = policy("User-agent: *\nDisallow: /img/*absent\n")
    assert folder.refusal(URL + "img/a.jpg") is None
    assert not folder.allows_made_up_path(URL + "img/a.jpg")
    assert folder.allows_made_up_path(URL + "other/a.jpg")


def test_no_file_an_empty_file_or_a_foreign_group_restrict_nothing():
    for robots in (None, "", "User-agent: otherbot\nDisallow: /\n", "<html>soft 404</html>"):
        rules = policy(robots)
        assert rules.refusal(URL + "a.jpg") is None


def test_a_file_the_parser_chokes_on_restricts_nothing(monkeypatch):
    from pipeline.stages.gather import consent

    def choke(text):
        raise RecursionError("deeply nested")

    monkeypatch.setattr(consent.Protego, "parse", staticmethod(choke))
    rules = policy("User-agent: *\nDisallow: /", '[{"location": "/", "tdm-reservation": 1}]')
    assert not rules.restricts and rules.refusal(URL + "a.jpg") is None


def test_crawl_delay_for_us_is_read_and_capped():
    assert policy("User-agent: *\nCrawl-delay: 2\n").crawl_delay == 2.0
    assert policy("User-agent: *\nCrawl-delay: 3600\n").crawl_delay == MAX_CRAWL_DELAY
    assert policy("User-agent: *\nDisallow: /x/\n").crawl_delay is None


def test_tdmrep_json_reserves_its_locations_with_their_policy():
    tdmrep = ('[{"location": "/private/*", "tdm-reservation": 1, '
              '"tdm-policy": "https://site.test/tdm-policy.json"},'
              ' {"location": "/private/open/", "tdm-reservation": 0}]')
    rules = policy(tdmrep=tdmrep)
    refusal = rules.refusal(URL + "private/a.jpg")
    assert refusal is not None and "tdm-reservation 1 for /private/*" in refusal
    assert "policy https://site.test/tdm-policy.json" in refusal
    assert rules.refusal(URL + "private/open/a.jpg") is None
    assert rules.refusal(URL + "public/a.jpg") is None
    assert policy(tdmrep='[{"location": "/", "tdm-reservation": true}]').restricts
    for broken in ("not json", '{"location": "/"}', '[{"tdm-reservation": 1}]', "[]",
                   '[{"location": "/", "tdm-reservation": "maybe"}]'):
        assert not policy(tdmrep=broken).restricts


ROBOTS = "/robots.txt"
CRAWL_DELAY = 0.3
PER_ROUTE = 5  # URLs per route and host: 60 in all, one sample picture each
TDMREP = "/.well-known/tdmrep.json"
SITES = {
    # The case: every /private/ image was fetched and kept.
    "star.test": {ROBOTS: (200, "User-agent: *\nDisallow: /private/\n")},
    # A group for our token overrides `*`, which refuses everything.
    "ours.test": {ROBOTS: (200, "User-agent: *\nDisallow: /\n\n"
                                "User-agent: pipeline\nAllow: /\n")},
    # A server error: complete disallow (RFC 9309 2.3.1.4) for this run.
    "broken.test": {ROBOTS: (503, "Service Unavailable")},
    # Forbidden: no restrictions (2.3.1.3).
    "forbidden.test": {ROBOTS: (403, "Forbidden")},
    "tdm.test": {TDMREP: (200, '[{"location": "/private/", "tdm-reservation": 1}]')},
    # One request at a time, this far apart.
    "slow.test": {ROBOTS: (200, f"User-agent: *\nCrawl-delay: {CRAWL_DELAY}\n")},
}


def write_list(sample: Path, base_port: int, path: Path) -> dict[str, tuple[str, str]]:
    """PER_ROUTE /img/ and /private/ URLs per host name, each its own file (so the mirror's
    per-path counts tell which were requested); id -> (host, route)."""
    wnid = sorted(p.name for p in (sample / "files").iterdir())[0]
    files = sorted(p.name for p in (sample / "files" / wnid).iterdir())
    lines, expected = [], {}
    names = iter(files)
    for host in SITES:
        for route in ("img", "private"):
            for _ in range(PER_ROUTE):
                image_id = f"{wnid}_{len(expected) + 1}"
                lines.append(f"{image_id}\thttp://{host}:{base_port}/{route}/{wnid}/{next(names)}")
                expected[image_id] = (host, route)
    path.write_text("".join(line + "\n" for line in lines))
    return expected


def run_options(out: Path, **overrides) -> GatherOptions:
    values = {"out": out, "processes": 2, "concurrency": 16, "per_host": 4, "timeout": 10.0,
              "retries": 1, "backoff": 0.05, "placeholder_after": 0,
              "resolve": tuple((host, None, "127.0.0.1") for host in SITES)}
    return GatherOptions(**{**values, **overrides})


def gather_sites(sample: Path, tmp_path: Path, **overrides):
    """Gather the SITES list from a mirror serving SITES' files: (id -> (host, route), the
    journal, the mirror's request counts, the report, the mirror's port)."""
    with serve_in_thread(sample, site_files=SITES) as mirror:
        port = int(mirror.base_url.rsplit(":", 1)[1])
        expected = write_list(sample, port, tmp_path / "urls.txt")
        wnid = next(iter(expected)).split("_")[0]
        report = gather_synsets(tmp_path / "urls.txt", [wnid],
                                run_options(tmp_path / "raw", **overrides))
        stats = mirror.stats()
    return expected, read_journal(tmp_path / "raw" / "gather.jsonl"), stats, report, port


@pytest.mark.slow
def test_gather_honours_robots_txt_and_tdmrep_and_asks_each_host_once(sample, tmp_path):
    expected, journal, stats, report, port = gather_sites(sample, tmp_path)
    outcomes = {host_route: Counter() for host_route in set(expected.values())}
    for image_id, host_route in expected.items():
        outcomes[host_route][journal[image_id]["outcome"]] += 1
    assert outcomes[("star.test", "img")] == {"ok": PER_ROUTE}
    assert outcomes[("star.test", "private")] == {"opted_out": PER_ROUTE}
    assert outcomes[("ours.test", "img")] == outcomes[("ours.test", "private")] == {"ok": PER_ROUTE}
    assert outcomes[("forbidden.test", "private")] == {"ok": PER_ROUTE}
    assert outcomes[("tdm.test", "img")] == {"ok": PER_ROUTE}
    assert outcomes[("tdm.test", "private")] == {"opted_out": PER_ROUTE}
    assert outcomes[("broken.test", "img")] == {"robots_unreachable": PER_ROUTE}
    assert outcomes[("broken.test", "private")] == {"robots_unreachable": PER_ROUTE}
    reasons = {journal[i]["error"] for i, (host, route) in expected.items()
               if (host, route) == ("star.test", "private")}
    assert reasons == {"robots.txt: Disallow: /private/ (User-agent: *)"}
    assert report.hosts_robots_unreachable == 1
    assert outcomes[("slow.test", "img")] == outcomes[("slow.test", "private")] == {"ok": PER_ROUTE}
    finished = sorted(journal[i]["time"] for i, (host, _) in expected.items()
                      if host == "slow.test")
    gaps = [later - earlier for earlier, later in zip(finished, finished[1:], strict=False)]
    assert min(gaps) >= CRAWL_DELAY * 0.8, gaps  # started CRAWL_DELAY apart, one at a time
    assert all(not journal[i]["final"] for i, (host, _) in expected.items()
               if host == "broken.test")
    # Refused URLs were never requested, nor was anything of the broken host but robots.txt.
    by_path = stats["by_path"]
    for image_id, (host, route) in expected.items():
        path = journal[image_id]["url"].split(f":{port}", 1)[1]
        assert by_path.get(path, 0) == (journal[image_id]["outcome"] == "ok"), (host, route)
    # robots.txt exactly once per host (twice for the broken one: --retries 1), tdmrep.json
    # once per host that answered robots.txt; two worker processes shared the hosts' URLs.
    for host in SITES:
        expected_robots = 2 if host == "broken.test" else 1
        assert by_path.get(f"{host}:{port}{ROBOTS}") == expected_robots, host
        assert by_path.get(f"{host}:{port}{TDMREP}", 0) == (0 if host == "broken.test" else 1)


@pytest.mark.slow
def test_ignore_robots_is_an_explicit_choice(sample, tmp_path):
    expected, journal, stats, _, _ = gather_sites(sample, tmp_path, honour_robots=False)
    by_host = Counter((expected[i][0], r["outcome"]) for i, r in journal.items())
    assert by_host[("star.test", "ok")] == by_host[("broken.test", "ok")] == 2 * PER_ROUTE
    assert by_host[("tdm.test", "opted_out")] == PER_ROUTE  # TDMRep is --ignore-opt-out's to skip
    assert not any(path.endswith(ROBOTS) for path in stats["by_path"])

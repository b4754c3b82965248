"""The real world's builder (pipeline/testing/serve_web.py, `build_real_world`) follows the REAL WEB
table: its hosts, names, URL shares, latencies and pictures. Nothing is served here (see
test_serve_web.py for that), so a 20,000-URL world is built in well under a second."""

import hashlib
import re
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from pipeline.formats.urllist import parse_url_line
from pipeline.testing import make_sample, serve_web
from pipeline.testing.serve_web import build_real_world, flickr_unavailable

N_URLS = 20_000
NAME = re.compile(r"^[a-z0-9-]+(\.[a-z0-9-]+)*\.(com|org|net|de|co\.uk|edu|jp)$")


@pytest.fixture(scope="module")
def world(picture_names):
    return build_real_world(picture_names, N_URLS, seed=0)


def urls_per_host(world) -> Counter[str]:
    return Counter(url.host for url in world.urls)


def test_hosts_follow_the_table(world):
    assert len(world.hosts) == round(N_URLS * serve_web.WORLD_HOSTS_PER_URL) == 5_500
    farms = world.hosts[:serve_web.FLICKR_FARMS]
    assert [h.name for h in farms] == [f"farm{i}.static.flickr.com" for i in range(1, 10)]
    assert {h.behaviour for h in farms} == {"flickr"}
    assert world.hosts[9].name == "s.yimg.com" and world.hosts[9].behaviour == "photo_unavailable"
    others = world.hosts[10:]
    counts = Counter(h.behaviour for h in others)
    for behaviour, share in serve_web.OTHER_HOST_MIX.items():
        assert abs(counts[behaviour] - share * len(others)) <= 1, behaviour
    assert others[0].behaviour == "alive"  # the biggest host after Flickr is up


def test_urls_go_to_flickr_and_zipf_like_over_the_rest(world):
    per_host = urls_per_host(world)
    flickr = sum(per_host[h.name] for h in world.hosts if h.behaviour == "flickr")
    assert flickr == round(N_URLS * serve_web.FLICKR_URL_SHARE)
    farm_counts = [per_host[f"farm{i}.static.flickr.com"] for i in range(1, 10)]
    assert min(farm_counts) > 0.8 * flickr / 9 and max(farm_counts) < 1.2 * flickr / 9
    others = [h.name for h in world.hosts[10:]]
    assert all(per_host[name] >= 1 for name in others)  # every host of the list has a URL
    assert per_host["s.yimg.com"] == 0  # reached by redirects only
    sizes = sorted((per_host[name] for name in others), reverse=True)
    assert sizes[0] >= 100 and sizes[0] == per_host[others[0]]  # a few big ones...
    assert sum(size == 1 for size in sizes) > 0.75 * len(sizes)  # ...and a long tail


def test_outcomes_follow_the_hosts_and_flickrs_hash(world):
    behaviour = {h.name: h.behaviour for h in world.hosts}
    flickr_urls = [url for url in world.urls if behaviour[url.host] == "flickr"]
    for url in flickr_urls:
        assert url.outcome == ("placeholder" if flickr_unavailable(url.path) else "ok")
        assert serve_web.FLICKR_PATH.fullmatch(url.path), url.path
    gone = sum(url.outcome == "placeholder" for url in flickr_urls) / len(flickr_urls)
    assert abs(gone - serve_web.FLICKR_UNAVAILABLE) < 0.02
    https = [url for url in world.urls if url.https]
    assert len(https) == round(N_URLS * serve_web.HTTPS_URL_SHARE)
    assert {behaviour[url.host] for url in https} == {"alive"}
    assert {url.outcome for url in https} == {"unreachable"}
    for url in world.urls:
        kind = behaviour[url.host]
        if kind not in ("flickr", "alive"):
            assert url.outcome == serve_web.BEHAVIOUR_OUTCOMES[kind]
        elif kind == "alive" and not url.https:
            assert url.outcome == "ok"
    summary = world.summary()
    assert summary["good"] == sum(url.outcome == "ok" for url in world.urls)
    assert summary["urls"] == N_URLS and summary["https_urls"] == len(https)
    assert sum(summary["outcomes"].values()) == N_URLS


def test_every_good_url_serves_a_picture_of_its_own(world, picture_names):
    pictures = []
    for url in world.urls:
        if url.outcome != "ok":
            continue
        match = serve_web.FLICKR_PATH.fullmatch(url.path)
        if match:
            wnid = f"n{match[1]}"
            pictures.append(f"{wnid}/{wnid}_{match[2]}.jpg")
        else:
            assert url.path.startswith("/img/")
            pictures.append(url.path[len("/img/"):])
    assert len(set(pictures)) == len(pictures) == world.summary()["good"]
    assert all((picture_names / "files" / picture).is_file() for picture in pictures)


def test_names_look_real_and_only_its_dns_knows_them(world):
    names = [h.name for h in world.hosts]
    assert len(set(names)) == len(names)
    assert all(NAME.match(name) for name in names), [n for n in names if not NAME.match(n)]
    records = world.dns_records()
    assert set(records) == set(names)
    for host in world.hosts:
        assert records[host.name] == ("congested" if host.behaviour == "dns_dead"
                                      else host.address)
    addresses = [h.address for h in world.hosts if h.address]
    assert len(set(addresses)) == len(addresses)
    assert all(a.startswith("127.") for a in addresses)


def test_latencies_are_per_host_and_fixed_by_the_seed(world, picture_names):
    low, high = serve_web.HOST_LATENCY
    latencies = [h.latency for h in world.hosts]
    assert all(low <= latency <= high for latency in latencies)
    assert min(latencies) < low + 0.005 and max(latencies) > high - 0.005
    again = build_real_world(picture_names, N_URLS, seed=0)
    assert again == world
    other = build_real_world(picture_names, N_URLS, seed=1)
    assert [h.latency for h in other.hosts] != latencies
    assert other.urls != world.urls


def test_written_list_is_imagenet_shaped(world, tmp_path):
    urls, expected = world.write(tmp_path, 8080)
    lines = urls.read_bytes().splitlines()
    assert len(lines) == N_URLS
    parsed = [parse_url_line(line) for line in lines]
    wnids = Counter(line.id.rsplit("_", 1)[0] for line in parsed)
    assert len(wnids) == serve_web.WORLD_SYNSETS and set(wnids.values()) == {100}
    assert all(re.fullmatch(r"n\d{8}", wnid) for wnid in wnids)
    for line in parsed:
        parts = urlsplit(line.url)
        assert parts.port == (None if parts.scheme == "https" else 8080)
    assert make_sample.read_expected(expected) == world.expected()


def test_a_small_sample_is_told_how_many_pictures_it_needs(sample):
    with pytest.raises(ValueError, match=r"this world serves \d+ distinct ones"):
        build_real_world(sample, 2_000)


def test_impossible_host_counts_are_refused(picture_names):
    with pytest.raises(ValueError, match="hosts"):
        build_real_world(picture_names, 100, n_hosts=5)
    with pytest.raises(ValueError, match="hosts"):
        build_real_world(picture_names, 100, n_hosts=80)  # more than the non-Flickr URLs


def test_placeholder_digests_cover_every_placeholder_picture(world):
    digests = world.placeholder_digests()
    placeholders = [h for h in world.hosts if h.behaviour in serve_web.PLACEHOLDER_BEHAVIOURS]
    assert len(digests) == len(placeholders) + 1  # and Flickr's
    flickr = (Path(world.root) / "placeholder.png").read_bytes()
    assert hashlib.sha256(flickr).hexdigest() in digests

"""What a site says about being crawled, asked once per host before its first image.

- robots.txt (RFC 9309), parsed by protego, which implements the RFC's matching (the group
  for our product token if there is one, else `*`; the longest match wins; Allow beats
  Disallow on a tie), where `urllib.robotparser` does not. 2xx: its rules (the first 500 KiB,
  as the RFC allows); 4xx: no restrictions (2.3.1.3); 5xx, 429 or no answer after the host
  connected (a reset, a timeout): "unreachable", complete disallow (2.3.1.4): the host's URLs
  are not requested in this run and are tried again by the next (`robots_unreachable`). A
  host that does not even connect is left to the breaker, as for any other request. Up to
  five redirects are followed (2.3.1.2), each checked like an image's; more, or a refused one,
  count as unavailable. `Crawl-delay` is honoured too (one request at a time, spaced by it,
  at most MAX_CRAWL_DELAY): it is not in the RFC, but it is what the site asked.
- TDMRep's `/.well-known/tdmrep.json` (W3C TDMRep 1.0): a list of rules, each a `location`
  pattern with `tdm-reservation` 1 (text and data mining reserved) or 0; matched like
  robots.txt patterns (longest wins), since the TDMRep patterns use the same syntax. Any
  answer but a 2xx JSON list means no reservation. The per-response `tdm-reservation` header
  is read with each image (`http`).

A URL refused by either ends as `opted_out`, never requested, with the rule that matched.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp
from protego import Protego
from yarl import URL

from pipeline.formats.journal import RETRYABLE_STATUSES
from pipeline.stages.gather.http import Attempt, fetch_policy_file, made_up_url
from pipeline.stages.gather.names import Resolver
from pipeline.stages.gather.options import PRODUCT_TOKEN, GatherOptions

log = logging.getLogger(__name__)

ROBOTS_PATH = "/robots.txt"
TDMREP_PATH = "/.well-known/tdmrep.json"
MAX_CRAWL_DELAY = 60.0  # seconds: a longer Crawl-delay is held to this


@dataclass
class SiteFiles:
    """The host's policy files as fetched (None: it has none): travels from the worker that
    fetched them to the coordinator, which keeps the parsed `SitePolicy` for the run."""

    robots: str | None
    tdmrep: str | None


async def fetch_site_files(session: aiohttp.ClientSession, url: str, options: GatherOptions,
                           resolver: Resolver) -> SiteFiles | Attempt:
    """The files of `url`'s host, or the failed Attempt that stands for the URL: a connection
    failure (the host's health decides), or robots.txt unreachable (complete disallow)."""
    robots: str | None = None
    if options.honour_robots:
        answer = await fetch_policy_file(session, _on_host(url, ROBOTS_PATH), options, resolver)
        if answer.outcome == "unreachable":  # no connection: the breaker's to judge
            return answer
        if _robots_unreachable(answer):
            # Retried in the run when an image would be: a 5xx/429, a reset; a timeout waits
            # for the next run.
            retry = answer.retry or answer.http_status in RETRYABLE_STATUSES
            return Attempt("robots_unreachable", final=False, http_status=answer.http_status,
                           retry=retry, error=f"robots.txt unreachable ({answer.error}): RFC "
                                              "9309 says to assume complete disallow")
        robots = _text(answer)
    tdmrep = None
    if options.honour_opt_out:
        answer = await fetch_policy_file(session, _on_host(url, TDMREP_PATH), options, resolver)
        if answer.outcome == "unreachable" and not options.honour_robots:
            return answer
        tdmrep = _text(answer)
    return SiteFiles(robots, tdmrep)


def _on_host(url: str, path: str) -> str:
    return str(URL(url, encoded=True).with_path(path).with_query(None).with_fragment(None))


def _robots_unreachable(answer: Attempt) -> bool:
    """5xx and 429, or no answer at all (a reset, a read timeout): RFC 9309 2.3.1.4. A final
    failure without a status (too many or refused redirects) is "unavailable" (2.3.1.2)."""
    if answer.http_status is None:
        return not answer.final
    return answer.http_status >= 500 or answer.http_status == 429


def _text(answer: Attempt) -> str | None:
    if answer.body is None or answer.http_status is None or not 200 <= answer.http_status < 300:
        return None
    return answer.body.decode("utf-8", "replace")


@dataclass
class SitePolicy:
    """A host's robots.txt and TDMRep rules, parsed: what may be fetched, and how often."""

    robots: Protego | None
    tdm: Protego | None  # tdmrep.json's rules as Allow (0) / Disallow (1) patterns
    tdm_policies: dict[str, str]  # location -> its tdm-policy URL, to quote in the reason

    @classmethod
    def parse(cls, files: SiteFiles) -> SitePolicy:
        robots = _parse_robots(files.robots) if files.robots else None
        tdm, policies = _parse_tdmrep(files.tdmrep)
        return cls(robots, tdm, policies)

    @property
    def restricts(self) -> bool:
        """Whether any URL could be refused: if not, none needs checking."""
        return self.robots is not None or self.tdm is not None

    @property
    def crawl_delay(self) -> float | None:
        delay = self.robots.crawl_delay(PRODUCT_TOKEN) if self.robots is not None else None
        return min(delay, MAX_CRAWL_DELAY) if delay else None

    def allows_made_up_path(self, url: str) -> bool:
        """Whether the host's files let us ask for a made-up path beside `url` (what the
        worker requests to find the host's placeholder picture)."""
        return not self.restricts or self.refusal(made_up_url(url)) is None

    def refusal(self, url: str) -> str | None:
        """Why the site refuses `url` to us (the rule that matched), or None."""
        if self.robots is not None and not self.robots.can_fetch(url, PRODUCT_TOKEN):
            pattern, group = _deciding_rule(self.robots, url)
            return f"robots.txt: Disallow: {pattern} (User-agent: {group})"
        if self.tdm is not None and not self.tdm.can_fetch(url, PRODUCT_TOKEN):
            location, _ = _deciding_rule(self.tdm, url)
            policy = self.tdm_policies.get(location)
            return (f"{TDMREP_PATH}: tdm-reservation 1 for {location} (W3C TDMRep: text and "
                    "data mining rights reserved" + (f"; policy {policy}" if policy else "")
                    + ")")
        return None


def _deciding_rule(parser: Protego, url: str) -> tuple[str, str]:
    """(pattern, group) of the Disallow rule that refused `url`. protego decides but does not
    say which rule: its rule list is read here, and if a later protego keeps it elsewhere,
    the reason names the path and "?" for the group instead."""
    try:
        from protego._utils import _quote_path

        rule_set = parser._get_matching_rule_set(PRODUCT_TOKEN)
        path = _quote_path(url)
        for rule in rule_set._rules:
            if rule.value.match(path):
                return rule.value._pattern, rule_set.user_agent
    except (AttributeError, ImportError):
        pass
    return URL(url, encoded=True).raw_path, "?"


def _parse_robots(text: str) -> Protego | None:
    """A site's file is anybody's text: one protego cannot parse restricts nothing (RFC 9309
    asks crawlers to use what they can parse), and never stops the run."""
    try:
        return Protego.parse(text)
    except Exception as exc:  # noqa: BLE001 - whatever the parser chokes on, see above
        log.debug("robots.txt not parsed (%s: %s): no restriction read", type(exc).__name__, exc)
        return None


def _parse_tdmrep(text: str | None) -> tuple[Protego | None, dict[str, str]]:
    """tdmrep.json as robots.txt rules for `*`; None when it reserves nothing."""
    rules = _tdmrep_rules(text)
    if not any(reserved for _, reserved, _ in rules):
        return None, {}
    lines = ["User-agent: *"] + [f"{'Disallow' if reserved else 'Allow'}: {location}"
                                 for location, reserved, _ in rules]
    policies = {location: policy for location, reserved, policy in rules if policy}
    return _parse_robots("\n".join(lines)), policies


def _tdmrep_rules(text: str | None) -> list[tuple[str, bool, str]]:
    """(location, reserved, policy URL) per well-formed rule; a file that is not a JSON list
    of objects reserves nothing (logged)."""
    if not text:
        return []
    try:
        data: Any = json.loads(text)
    except ValueError:
        log.debug("%s is not JSON: no reservation read from it", TDMREP_PATH)
        return []
    if not isinstance(data, list):
        return []
    rules = []
    for rule in data:
        if not isinstance(rule, dict) or not isinstance(rule.get("location"), str):
            continue
        location = rule["location"].strip() or "/"
        value = rule.get("tdm-reservation", 0)
        reserved = value is True or str(value).strip() == "1"
        policy = rule.get("tdm-policy")
        rules.append((location if location.startswith("/") else "/" + location, reserved,
                      policy if isinstance(policy, str) else ""))
    return rules

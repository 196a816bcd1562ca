"""``normalize_domain``: the company's registrable web domain, from whatever the CSV row offers.

Exports carry the domain in many shapes (``HTTPS://WWW.Acme.co.uk/about?x=1``, ``acme.com ``,
``jane@acme.io``, ``mailto:...``, IDNs). The fields in ``config.source_fields`` are tried in order
and the first value that yields a usable domain wins. A value is skipped, with its reason kept for
the error message, when it points at a social profile, directory or link shortener (a LinkedIn page
is not the company's site), when an email uses a free-mail provider, or when it is an IP address,
localhost, a bare public suffix or garbage.

The registrable domain ("eTLD+1") comes from the Public Suffix List bundled with the
``publicsuffixlist`` package: ``PublicSuffixList()`` reads the ``.dat`` file shipped inside the
package and never downloads (only its separate ``update`` module does). Private-section suffixes
count, so ``acme.github.io`` stays ``acme.github.io`` instead of collapsing to ``github.io``.

IDNs are encoded per label with punycode after NFKC + lowercasing (IDNA 2008 / UTS 46 style), not
with Python's ``idna`` codec, which implements IDNA 2003 and maps ``straße.de`` to ``strasse.de``.

Config: ``source_fields`` (ordered list), ``extra_blocked_domains`` and
``extra_free_mail_domains`` (lists of registrable domains added to the built-in ones), and
``allow_missing`` (default false): an item without a usable domain then completes with
``domain`` null and the reason under ``missing``, instead of failing, so the rest of the pipeline
still runs for it (a later step can be skipped for it: ``config.skip_unless``).
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any
from urllib.parse import urlsplit

from publicsuffixlist import PublicSuffixList

from shared.errors import ConfigurationError, TerminalError
from shared.step_inputs import DOMAIN_FIELDS
from shared.steps.base import StepContext, config_fields, config_flag, field_value, present_keys

# Declared with the step's inputs (shared.step_inputs), so the import checks the same list.
DEFAULT_SOURCE_FIELDS = DOMAIN_FIELDS


def _domain_list(text: str) -> frozenset[str]:
    return frozenset(text.lower().split())


# Registrable domains whose pages are about a company but are not its own site.
BLOCKED_DOMAINS = _domain_list(
    """
    linkedin.com lnkd.in facebook.com fb.com fb.me m.me instagram.com twitter.com x.com t.co
    threads.net tiktok.com youtube.com youtu.be pinterest.com reddit.com medium.com tumblr.com
    vk.com xing.com whatsapp.com wa.me t.me telegram.me discord.gg discord.com bsky.app
    github.com gitlab.com bitbucket.org
    crunchbase.com angel.co angellist.com wellfound.com pitchbook.com zoominfo.com apollo.io
    owler.com dnb.com bloomberg.com glassdoor.com indeed.com producthunt.com g2.com capterra.com
    trustpilot.com yelp.com tripadvisor.com wikipedia.org wikidata.org
    google.com goo.gl g.page g.co bing.com
    bit.ly tinyurl.com ow.ly buff.ly rebrand.ly linktr.ee about.me
    """
)

# Consumer mailbox providers: an address there says nothing about the employer's domain.
FREE_MAIL_DOMAINS = _domain_list(
    """
    gmail.com googlemail.com yahoo.com yahoo.co.uk yahoo.fr yahoo.de ymail.com rocketmail.com
    outlook.com hotmail.com hotmail.co.uk hotmail.fr live.com msn.com aol.com icloud.com me.com
    mac.com proton.me protonmail.com pm.me tutanota.com fastmail.com hey.com zoho.com gmx.com
    gmx.net gmx.de web.de t-online.de mail.com yandex.com yandex.ru mail.ru qq.com 163.com
    126.com naver.com orange.fr free.fr laposte.net libero.it btinternet.com comcast.net
    verizon.net att.net sbcglobal.net rediffmail.com
    """
)

_EDGE_JUNK = " \t\r\n\"'`<>()[]{}"
_TRAILING_JUNK = ".,;:!?"
_SPLIT = re.compile(r"[\s,;|]+")
_SCHEME = re.compile(r"^(?P<scheme>[a-z][a-z0-9+.-]*)://", re.IGNORECASE)
# "http//acme.com", "https:/acme.com", "https:acme.com": typed URLs that lost a character.
_HTTP_TYPO = re.compile(r"^https?(?::/{0,3}|/{1,3})", re.IGNORECASE)
_WEB_SCHEMES = frozenset({"http", "https", "ftp"})
_ASCII_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
# Ideographic and halfwidth full stops are dots in IDNA (UTS 46 maps them to ".").
_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})


@cache
def _psl() -> PublicSuffixList:
    # accept_unknown=False: an unlisted TLD ("acme.local", "acme.comm") is garbage, not a domain.
    return PublicSuffixList(accept_unknown=False)


@dataclass(frozen=True, slots=True)
class _Found:
    domain: str
    domain_unicode: str
    host: str


class _NoDomainError(Exception):
    """Why one token names no company domain.

    ``specific`` reasons (free-mail, social profile, IP, ...) beat the generic "is not a URL or
    domain" when several tokens of one value fail, so the message points at the real problem.
    """

    def __init__(self, reason: str, *, specific: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.specific = specific


_NOT_A_DOMAIN = "is not a URL or domain"


def _to_ascii_label(label: str) -> str:
    if label.isascii():
        return label
    if (
        not all(unicodedata.category(ch)[0] in "LMN" or ch == "-" for ch in label)
        or label.startswith("-")
        or label.endswith("-")
    ):
        raise _NoDomainError(_NOT_A_DOMAIN, specific=False)
    return "xn--" + label.encode("punycode").decode("ascii")


def _to_unicode_label(label: str) -> str:
    if not label.startswith("xn--"):
        return label
    try:
        decoded = label[4:].encode("ascii").decode("punycode")
    except UnicodeError:
        raise _NoDomainError("is not a valid internationalized domain name") from None
    if not decoded or decoded.isascii() or _to_ascii_label(decoded) != label:
        raise _NoDomainError("is not a valid internationalized domain name")
    return decoded


def _registrable(host: str) -> _Found:
    """The registrable domain of a host; raises ``_NoDomainError`` saying why if there is none."""
    host = unicodedata.normalize("NFKC", host.translate(_DOTS)).lower().strip(".")
    if not host:
        raise _NoDomainError(_NOT_A_DOMAIN, specific=False)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        raise _NoDomainError("is an IP address, not a domain")
    if host == "localhost" or host.endswith(".localhost"):
        raise _NoDomainError("is localhost, not a public domain")
    labels = host.split(".")
    if len(labels) < 2:
        raise _NoDomainError(_NOT_A_DOMAIN, specific=False)
    if all(label.isdigit() for label in labels):
        raise _NoDomainError("is an IP address, not a domain")
    ascii_labels = [_to_ascii_label(label) for label in labels]
    if not all(_ASCII_LABEL.match(label) for label in ascii_labels) or ascii_labels[-1].isdigit():
        raise _NoDomainError(_NOT_A_DOMAIN, specific=False)
    ascii_host = ".".join(ascii_labels)
    if len(ascii_host) > 253:
        raise _NoDomainError(_NOT_A_DOMAIN, specific=False)
    unicode_labels = [_to_unicode_label(label) for label in ascii_labels]

    psl = _psl()
    domain = psl.privatesuffix(ascii_host)
    if domain is None:
        if psl.is_public(ascii_host):
            raise _NoDomainError("is a public suffix, not a company domain")
        raise _NoDomainError(f"has an unknown top-level domain '.{unicode_labels[-1]}'")
    depth = domain.count(".") + 1
    return _Found(
        domain=domain,
        domain_unicode=".".join(unicode_labels[-depth:]),
        host=ascii_host,
    )


def _host_of(token: str) -> tuple[str, bool]:
    """The host name a token names, and whether the token is an email address."""
    if token.lower().startswith("mailto:"):
        address = token[len("mailto:") :].split("?", 1)[0]
        if "@" not in address:
            raise _NoDomainError("is not a valid email address", specific=False)
        return address.rsplit("@", 1)[1], True
    try:
        ipaddress.ip_address(token)
    except ValueError:
        pass
    else:
        raise _NoDomainError("is an IP address, not a domain")
    match = _SCHEME.match(token)
    if match is None and "@" in token and "/" not in token:
        local, _, host = token.rpartition("@")
        if not local or not host:
            raise _NoDomainError("is not a valid email address", specific=False)
        return host, True
    if match is not None:
        scheme = match.group("scheme").lower()
        if scheme not in _WEB_SCHEMES:
            raise _NoDomainError(f"has an unsupported URL scheme '{scheme}'")
        url = token
    else:
        url = "http://" + _HTTP_TYPO.sub("", token).lstrip("/")
    try:
        url_host = urlsplit(url).hostname
    except ValueError:
        raise _NoDomainError(_NOT_A_DOMAIN, specific=False) from None
    if not url_host:
        raise _NoDomainError(_NOT_A_DOMAIN, specific=False)
    return url_host, False


def _clean_token(token: str) -> str:
    return token.strip(_EDGE_JUNK).rstrip(_TRAILING_JUNK).strip(_EDGE_JUNK).lstrip(".")


def _parse_token(
    token: str,
    *,
    email_field: bool = False,
    blocked: frozenset[str] = BLOCKED_DOMAINS,
    free_mail: frozenset[str] = FREE_MAIL_DOMAINS,
) -> _Found:
    """The company domain one token names; raises ``_NoDomainError`` when it names none."""
    token = _clean_token(token)
    if not token:
        raise _NoDomainError(_NOT_A_DOMAIN, specific=False)
    host, is_email = _host_of(token)
    found = _registrable(host)
    labels = found.host.split(".")
    # Parents of the host too: a blocked platform may sit in the PSL's private section
    # ("acme.wixsite.com" is registrable on its own) or be added by config.
    for parent in (".".join(labels[i:]) for i in range(len(labels) - 1)):
        if parent in blocked:
            raise _NoDomainError(f"is a {parent} page, not the company's own site")
    if (is_email or email_field) and found.domain in free_mail:
        raise _NoDomainError(f"uses free-mail domain {found.domain}")
    return found


def _short(value: str, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _parse_field(
    field: str, value: str, blocked: frozenset[str], free_mail: frozenset[str]
) -> _Found | str:
    """The domain a field's value yields, or the reason it yields none (for the error message).

    A cell may hold several tokens ("acme.com, acme.io", "Jane Doe <jane@acme.io>"): the first
    token that yields a domain wins.
    """
    email_field = "mail" in field.lower()
    tokens = [token for token in map(_clean_token, _SPLIT.split(value)) if token]
    best: tuple[str, _NoDomainError] | None = None
    for token in tokens:
        try:
            return _parse_token(
                token, email_field=email_field, blocked=blocked, free_mail=free_mail
            )
        except _NoDomainError as exc:
            if best is None or (exc.specific and not best[1].specific):
                best = (token, exc)
    if best is None:
        return f"{field}={_short(value)} {_NOT_A_DOMAIN}"
    token, rejection = best
    if len(tokens) == 1 or not rejection.specific:
        return f"{field}={_short(value)} {rejection.reason}"
    return f"{field}={_short(value)}: {_short(token)} {rejection.reason}"


def _domain_set(config: Mapping[str, Any], key: str, base: frozenset[str]) -> frozenset[str]:
    extra = config.get(key)
    if extra is None:
        return base
    if not isinstance(extra, list) or not all(isinstance(item, str) for item in extra):
        raise ConfigurationError(f"config.{key} must be a list of domains, got {extra!r}")
    return base | {item.strip().lower().strip(".") for item in extra}


def find_domain(raw: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    fields = config_fields(config, "source_fields", DEFAULT_SOURCE_FIELDS)
    blocked = _domain_set(config, "extra_blocked_domains", BLOCKED_DOMAINS)
    free_mail = _domain_set(config, "extra_free_mail_domains", FREE_MAIL_DOMAINS)
    tried: list[str] = []
    for field in fields:
        found = field_value(raw, field)
        if found is None:
            continue
        key, value = found
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if not isinstance(value, str):
            tried.append(f"{key}={value!r} is not text ({type(value).__name__})")
            continue
        outcome = _parse_field(key, value, blocked, free_mail)
        if isinstance(outcome, str):
            tried.append(outcome)
            continue
        return {
            "domain": outcome.domain,
            "domain_unicode": outcome.domain_unicode,
            "host": outcome.host,
            "source_field": key,
            "source_value": value,
        }
    if tried:
        raise TerminalError("no usable domain: " + "; ".join(tried))
    raise TerminalError(
        f"no usable domain: no value in any of {', '.join(fields)} ({present_keys(raw)})"
    )


async def normalize_domain(raw: Mapping[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Result: ``domain`` (ASCII registrable domain), ``domain_unicode``, ``host`` (full ASCII
    host), ``source_field`` and ``source_value`` (the input that produced it); with
    ``allow_missing``, all null and ``missing`` (why) when the row has no usable domain."""
    allow_missing = config_flag(ctx.config, "allow_missing")
    try:
        return find_domain(raw, ctx.config)
    except ConfigurationError:
        raise
    except TerminalError as exc:
        if not allow_missing:
            raise
        empty = dict.fromkeys(("domain", "domain_unicode", "host", "source_field", "source_value"))
        return {**empty, "missing": str(exc)}

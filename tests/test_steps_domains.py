"""normalize_domain: messy website / URL / email values to a registrable domain, offline."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any
from uuid import UUID

import pytest

from shared.errors import ConfigurationError, TerminalError
from shared.steps import HANDLERS, StepContext, domains
from shared.steps.domains import find_domain, normalize_domain


async def _no_heartbeat() -> None:
    return None


def _ctx(config: Mapping[str, Any] | None = None) -> StepContext:
    return StepContext(
        batch_id=UUID(int=1),
        item_id=UUID(int=2),
        step_name="normalize_domain",
        attempt=1,
        config=config or {},
        heartbeat=_no_heartbeat,
    )


# (field, messy value, registrable domain, full host)
SINGLE_FIELD: list[tuple[str, str, str, str]] = [
    ("website", "HTTPS://WWW.Acme.co.uk/about?x=1", "acme.co.uk", "www.acme.co.uk"),
    ("website", "acme.com ", "acme.com", "acme.com"),
    ("website", "  www.acme.io\t", "acme.io", "www.acme.io"),
    ("url", "http://shop.acme.com.au:8080", "acme.com.au", "shop.acme.com.au"),
    ("website", "https://user:pw@Acme.com.:443/path#frag", "acme.com", "acme.com"),
    ("website", "acme.com.", "acme.com", "acme.com"),
    ("website", "acme.com/about-us", "acme.com", "acme.com"),
    ("website", "acme.com:8443", "acme.com", "acme.com"),
    ("website", "//cdn.acme.net/x.js", "acme.net", "cdn.acme.net"),
    ("website", "http//acme.com", "acme.com", "acme.com"),
    ("website", "https:/acme.com", "acme.com", "acme.com"),
    ("website", "ftp://files.acme.org", "acme.org", "files.acme.org"),
    ("website", "<https://acme.com>", "acme.com", "acme.com"),
    ("website", '"acme.com"', "acme.com", "acme.com"),
    ("website", "acme.com, acme.io", "acme.com", "acme.com"),
    ("website", "see acme.com", "acme.com", "acme.com"),
    ("domain", "a.b.c.acme.co.jp", "acme.co.jp", "a.b.c.acme.co.jp"),
    ("domain", "ACME.COM.BR", "acme.com.br", "acme.com.br"),
    ("domain", "acme.ltd.uk", "acme.ltd.uk", "acme.ltd.uk"),
    (
        "website",
        "\uff21\uff23\uff2d\uff25\uff0e\uff23\uff2f\uff2d",
        "acme.com",
        "acme.com",
    ),  # fullwidth
    ("website", "acme。com", "acme.com", "acme.com"),
    # Private PSL section: a GitHub Pages / Heroku / Wix site is the company's own subdomain.
    ("website", "acme.github.io", "acme.github.io", "acme.github.io"),
    ("website", "https://acme.herokuapp.com/", "acme.herokuapp.com", "acme.herokuapp.com"),
    ("website", "acme.wixsite.com", "acme.wixsite.com", "acme.wixsite.com"),
    # A free-mail provider's own site is a fine website (Yahoo the company).
    ("website", "https://www.yahoo.com", "yahoo.com", "www.yahoo.com"),
    # Emails, in any field.
    ("email", "jane@acme.io", "acme.io", "acme.io"),
    ("email", "Jane.Doe@Mail.ACME.co.uk ", "acme.co.uk", "mail.acme.co.uk"),
    ("email", "mailto:x@y.com", "y.com", "y.com"),
    ("email", "mailto:sales@acme.com?subject=Hi", "acme.com", "acme.com"),
    ("email", "Jane Doe <jane@acme.io>", "acme.io", "acme.io"),
    ("work_email", "jane@acme.io", "acme.io", "acme.io"),
    ("website", "info@acme.io", "acme.io", "acme.io"),
    # Headers inserted without normalization still count.
    ("Website", "acme.com", "acme.com", "acme.com"),
    ("Company Website", "acme.com", "acme.com", "acme.com"),
]


@pytest.mark.parametrize(("field", "value", "domain", "host"), SINGLE_FIELD)
def test_finds_registrable_domain(field: str, value: str, domain: str, host: str) -> None:
    assert find_domain({field: value, "name": "Acme"}, {}) == {
        "domain": domain,
        "domain_unicode": domain,
        "host": host,
        "source_field": field,
        "source_value": value,
    }


# (value, ASCII domain, Unicode domain, ASCII host): punycode for matching, Unicode for display.
IDN: list[tuple[str, str, str, str]] = [
    ("münchen.de", "xn--mnchen-3ya.de", "münchen.de", "xn--mnchen-3ya.de"),
    ("https://WWW.München.DE/", "xn--mnchen-3ya.de", "münchen.de", "www.xn--mnchen-3ya.de"),
    ("xn--mnchen-3ya.de", "xn--mnchen-3ya.de", "münchen.de", "xn--mnchen-3ya.de"),
    # IDNA 2008: ß is kept, not mapped to "ss" as Python's IDNA 2003 codec would.
    ("straße.de", "xn--strae-oqa.de", "straße.de", "xn--strae-oqa.de"),
    ("http://例え.テスト.jp", "xn--zckzah.jp", "テスト.jp", "xn--r8jz45g.xn--zckzah.jp"),
    ("bücher.acme.ch", "acme.ch", "acme.ch", "xn--bcher-kva.acme.ch"),
]


@pytest.mark.parametrize(("value", "domain", "unicode_domain", "host"), IDN)
def test_internationalized_domains(value: str, domain: str, unicode_domain: str, host: str) -> None:
    result = find_domain({"website": value}, {})
    assert (result["domain"], result["domain_unicode"], result["host"]) == (
        domain,
        unicode_domain,
        host,
    )


# (row, field that wins, domain): field order, and unusable fields skipped.
SEVERAL_FIELDS: list[tuple[dict[str, Any], str, str]] = [
    ({"website": "acme.com", "email": "jane@other.com"}, "website", "acme.com"),
    ({"email": "jane@other.com", "website": "acme.com"}, "website", "acme.com"),
    ({"website": "", "domain": "acme.com"}, "domain", "acme.com"),
    ({"website": None, "url": "acme.com"}, "url", "acme.com"),
    ({"website": "n/a", "domain": "acme.com"}, "domain", "acme.com"),
    (
        {"website": "https://www.linkedin.com/company/acme", "email": "j@acme.com"},
        "email",
        "acme.com",
    ),
    (
        {"website": "https://facebook.com/acme", "company_website": "acme.de"},
        "company_website",
        "acme.de",
    ),
    ({"url": "https://x.com/acme", "homepage": "www.acme.fr"}, "homepage", "acme.fr"),
    ({"website": "bit.ly/acme", "domain": "acme.com"}, "domain", "acme.com"),
    ({"website": "10.1.2.3", "company_domain": "acme.com"}, "company_domain", "acme.com"),
    ({"email": "jane@gmail.com", "work_email": "jane@acme.com"}, "work_email", "acme.com"),
    ({"email": "jane@outlook.com", "website": "acme.com"}, "website", "acme.com"),
]


@pytest.mark.parametrize(("row", "field", "domain"), SEVERAL_FIELDS)
def test_tries_fields_in_order(row: dict[str, Any], field: str, domain: str) -> None:
    result = find_domain(row, {})
    assert (result["source_field"], result["domain"]) == (field, domain)
    assert result["source_value"] == row[field]


REJECTED: list[tuple[dict[str, Any], str]] = [
    (
        {"website": "n/a", "email": "jane@gmail.com"},
        "no usable domain: website='n/a' is not a URL or domain; "
        "email='jane@gmail.com' uses free-mail domain gmail.com",
    ),
    ({"website": "http://10.0.0.1"}, "website='http://10.0.0.1' is an IP address, not a domain"),
    ({"website": "192.168.1.20:8080"}, "is an IP address, not a domain"),
    ({"website": "https://[2001:db8::1]/"}, "is an IP address, not a domain"),
    ({"website": "::1"}, "is an IP address, not a domain"),
    ({"website": "localhost"}, "website='localhost' is localhost, not a public domain"),
    ({"website": "http://localhost:3000"}, "is localhost, not a public domain"),
    ({"domain": "co.uk"}, "domain='co.uk' is a public suffix, not a company domain"),
    ({"domain": ".com"}, "domain='.com' is not a URL or domain"),
    ({"domain": "com.au"}, "is a public suffix, not a company domain"),
    ({"domain": "blogspot.com"}, "is a public suffix, not a company domain"),
    ({"website": "acme.local"}, "website='acme.local' has an unknown top-level domain '.local'"),
    ({"website": "acme.comm"}, "has an unknown top-level domain '.comm'"),
    ({"website": "intranet"}, "website='intranet' is not a URL or domain"),
    ({"website": "Acme Inc"}, "website='Acme Inc' is not a URL or domain"),
    ({"website": "acme..com"}, "is not a URL or domain"),
    ({"website": "-acme.com"}, "is not a URL or domain"),
    ({"website": "acme_corp.com"}, "is not a URL or domain"),
    ({"website": "xn--zz.com"}, "is not a valid internationalized domain name"),
    ({"website": "javascript:alert(1)"}, "is not a URL or domain"),
    ({"website": "file:///etc/passwd"}, "has an unsupported URL scheme 'file'"),
    (
        {"website": "https://www.linkedin.com/company/acme"},
        "is a linkedin.com page, not the company's own site",
    ),
    ({"website": "linkedin.com/in/jane"}, "is a linkedin.com page"),
    ({"website": "https://m.facebook.com/acme"}, "is a facebook.com page"),
    ({"website": "twitter.com/acme"}, "is a twitter.com page"),
    ({"website": "https://x.com/acme"}, "is a x.com page"),
    ({"website": "https://www.crunchbase.com/organization/acme"}, "is a crunchbase.com page"),
    ({"website": "https://sites.google.com/view/acme"}, "is a google.com page"),
    ({"website": "https://goo.gl/maps/abc"}, "is a goo.gl page"),
    (
        {"email": "jane@hotmail.co.uk"},
        "email='jane@hotmail.co.uk' uses free-mail domain hotmail.co.uk",
    ),
    ({"email": "JANE@YAHOO.COM"}, "uses free-mail domain yahoo.com"),
    ({"work_email": "gmail.com"}, "work_email='gmail.com' uses free-mail domain gmail.com"),
    ({"email": "jane@"}, "email='jane@' is not a valid email address"),
    ({"email": "mailto:"}, "email='mailto:' is not a URL or domain"),
    ({"email": "mailto:sales"}, "email='mailto:sales' is not a valid email address"),
    # The specific reason of one part wins over the generic one of another.
    (
        {"email": "Jane Doe <jane@gmail.com>"},
        "email='Jane Doe <jane@gmail.com>': 'jane@gmail.com' uses free-mail domain gmail.com",
    ),
    ({"website": 42}, "no usable domain: website=42 is not text (int)"),
    (
        {"name": "Acme", "phone": "+1 555"},
        "no usable domain: no value in any of website, domain, company_domain, url, "
        "company_website, homepage, email, work_email (row has: name, phone)",
    ),
    ({}, "no value in any of website, domain"),
    ({"website": "   ", "email": ""}, "no value in any of website"),
]


@pytest.mark.parametrize(("row", "message"), REJECTED)
def test_rejects_with_specific_message(row: dict[str, Any], message: str) -> None:
    with pytest.raises(TerminalError) as info:
        find_domain(row, {})
    assert message in str(info.value)
    assert str(info.value).startswith("no usable domain: ")


def test_long_values_are_shortened_in_messages() -> None:
    with pytest.raises(TerminalError) as info:
        find_domain({"website": "x" * 500}, {})
    assert len(str(info.value)) < 200


@pytest.mark.parametrize(
    ("config", "row", "expected"),
    [
        ({"source_fields": ["email"]}, {"website": "acme.com", "email": "j@beta.io"}, "beta.io"),
        ({"source_fields": ["url", "website"]}, {"website": "a.com", "url": "b.com"}, "b.com"),
        ({"source_fields": "company_url"}, {"company_url": "acme.com"}, "acme.com"),
        (
            {"extra_blocked_domains": ["wixsite.com"]},
            {"website": "acme.wixsite.com", "domain": "acme.com"},
            "acme.com",
        ),
        (
            {"extra_free_mail_domains": ["corp-mail.com"]},
            {"email": "j@corp-mail.com", "domain": "acme.com"},
            "acme.com",
        ),
    ],
)
def test_config(config: dict[str, Any], row: dict[str, Any], expected: str) -> None:
    assert find_domain(row, config)["domain"] == expected


def test_config_source_fields_restricts_the_fields_tried() -> None:
    with pytest.raises(TerminalError, match="no value in any of email"):
        find_domain({"website": "acme.com"}, {"source_fields": ["email"]})


@pytest.mark.parametrize(
    "config",
    [
        {"source_fields": []},
        {"source_fields": [1, 2]},
        {"source_fields": {"a": 1}},
        {"extra_blocked_domains": "linkedin.com"},
    ],
)
def test_bad_config_is_a_configuration_error(config: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        find_domain({"website": "acme.com"}, config)


def test_public_suffix_list_loads_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("normalize_domain must not touch the network")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    domains._psl.cache_clear()  # load the bundled list again, now with the network refused
    assert find_domain({"website": "https://www.acme.co.uk"}, {})["domain"] == "acme.co.uk"


@pytest.mark.asyncio
async def test_handler_is_registered() -> None:
    assert HANDLERS["normalize_domain"] is normalize_domain
    result = await HANDLERS["normalize_domain"]({"website": "https://www.acme.co.uk"}, _ctx())
    assert result["domain"] == "acme.co.uk"
    assert result["source_field"] == "website"


@pytest.mark.asyncio
async def test_handler_raises_terminal_error() -> None:
    with pytest.raises(TerminalError, match=r"uses free-mail domain gmail\.com"):
        await normalize_domain({"email": "a@gmail.com"}, _ctx())


@pytest.mark.asyncio
async def test_allow_missing_completes_without_a_domain() -> None:
    found = await normalize_domain({"email": "a@gmail.com"}, _ctx({"allow_missing": True}))
    assert found == {
        "domain": None,
        "domain_unicode": None,
        "host": None,
        "source_field": None,
        "source_value": None,
        "missing": "no usable domain: email='a@gmail.com' uses free-mail domain gmail.com",
    }
    kept = await normalize_domain({"website": "acme.io"}, _ctx({"allow_missing": True}))
    assert kept["domain"] == "acme.io" and "missing" not in kept
    with pytest.raises(ConfigurationError):  # a bad setting is still one
        await normalize_domain({}, _ctx({"allow_missing": True, "source_fields": []}))
    with pytest.raises(ConfigurationError, match="allow_missing must be true or false"):
        await normalize_domain({"website": "acme.io"}, _ctx({"allow_missing": "yes"}))

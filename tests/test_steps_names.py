"""clean_company_name: legal suffixes, noise and casing off messy CRM / CSV names."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from uuid import UUID

import pytest

from shared.errors import ConfigurationError, TerminalError
from shared.steps import HANDLERS, StepContext
from shared.steps.names import clean_company_name, find_name


async def _no_heartbeat() -> None:
    return None


def _ctx(config: Mapping[str, Any] | None = None) -> StepContext:
    return StepContext(
        batch_id=UUID(int=1),
        item_id=UUID(int=2),
        step_name="clean_company_name",
        attempt=1,
        config=config or {},
        heartbeat=_no_heartbeat,
    )


# (raw name, cleaned name, removed parts)
CLEANED: list[tuple[str, str, list[str]]] = [
    # Legal suffixes, with or without comma and dots, repeated.
    ("Acme Holdings, Inc.", "Acme Holdings", ["Inc."]),
    ("Acme Inc", "Acme", ["Inc"]),
    ("Acme, Inc", "Acme", ["Inc"]),
    ("Acme,Inc.", "Acme", ["Inc."]),
    ("Acme Incorporated", "Acme", ["Incorporated"]),
    ("Acme LLC", "Acme", ["LLC"]),
    ("Acme L.L.C.", "Acme", ["L.L.C."]),
    ("Acme, llc", "Acme", ["llc"]),
    ("Acme Ltd", "Acme", ["Ltd"]),
    ("Acme Limited", "Acme", ["Limited"]),
    ("Acme Corp.", "Acme", ["Corp."]),
    ("Toyota Motor Corporation", "Toyota Motor", ["Corporation"]),
    ("3M Co", "3M", ["Co"]),
    ("Acme Co., Ltd.", "Acme", ["Co.", "Ltd."]),
    ("Acme Inc Inc", "Acme", ["Inc", "Inc"]),
    ("Acme Corp., Inc.", "Acme", ["Corp.", "Inc."]),
    ("Siemens AG", "Siemens", ["AG"]),
    ("Acme GmbH", "Acme", ["GmbH"]),
    ("Acme GmbH & Co. KG", "Acme", ["GmbH & Co. KG"]),
    ("SAP SE", "SAP", ["SE"]),
    ("Acme S.A.", "Acme", ["S.A."]),
    ("Acme SA", "Acme", ["SA"]),
    ("Acme SAS", "Acme", ["SAS"]),
    ("Acme SARL", "Acme", ["SARL"]),
    ("Grupo Bimbo, S.A.B. de C.V.", "Grupo Bimbo", ["S.A.B. de C.V."]),
    ("Acme B.V.", "Acme", ["B.V."]),
    ("Acme BV", "Acme", ["BV"]),
    ("Acme N.V.", "Acme", ["N.V."]),
    ("Acme Pty Ltd", "Acme", ["Pty Ltd"]),
    ("Acme (Pty) Ltd", "Acme", ["(Pty) Ltd"]),
    ("Acme Pte. Ltd.", "Acme", ["Pte. Ltd."]),
    ("Acme Private Limited", "Acme", ["Private Limited"]),
    ("Acme Sdn Bhd", "Acme", ["Sdn Bhd"]),
    ("Barclays PLC", "Barclays", ["PLC"]),
    ("KPMG LLP", "KPMG", ["LLP"]),
    ("Nokia Oyj", "Nokia", ["Oyj"]),
    ("Acme Oy", "Acme", ["Oy"]),
    ("Volvo AB", "Volvo", ["AB"]),
    ("Equinor ASA", "Equinor", ["ASA"]),
    ("Acme AS", "Acme", ["AS"]),
    ("Maersk A/S", "Maersk", ["A/S"]),
    ("Acme ApS", "Acme", ["ApS"]),
    ("Acme S.p.A.", "Acme", ["S.p.A."]),
    ("Acme S.r.l.", "Acme", ["S.r.l."]),
    ("Acme K.K.", "Acme", ["K.K."]),
    ("Acme KK", "Acme", ["KK"]),
    ("Acme Kft.", "Acme", ["Kft."]),
    ("Acme sp. z o.o.", "Acme", ["sp. z o.o."]),
    ("Acme Ltda", "Acme", ["Ltda"]),
    ("Tiffany & Co.", "Tiffany", ["& Co."]),
    ("Acme Company Limited", "Acme Company", ["Limited"]),
    # Words that only look like suffixes stay.
    ("The Walt Disney Company", "The Walt Disney Company", []),
    ("Limited Brands", "Limited Brands", []),
    ("The Limited", "The Limited", []),
    ("Corporation Bank", "Corporation Bank", []),
    ("Incubator Labs", "Incubator Labs", []),
    ("Costco Wholesale", "Costco Wholesale", []),
    # Noise.
    ("Acme (formerly Foo) LLC", "Acme", ["(formerly Foo)", "LLC"]),
    (
        "Meta Platforms, Inc. (formerly Facebook, Inc.)",
        "Meta Platforms",
        ["(formerly Facebook, Inc.)", "Inc."],
    ),
    ("Acme [fka Foo Corp]", "Acme", ["[fka Foo Corp]"]),
    ("Acme (now part of Bar)", "Acme", ["(now part of Bar)"]),
    ("Acme, formerly Foo Inc", "Acme", ["formerly Foo Inc"]),
    ("Acme - Official Site", "Acme", ["- Official Site"]),
    ("Acme Inc. - Official Website", "Acme", ["- Official Website", "Inc."]),
    ("Acme | LinkedIn", "Acme", ["| LinkedIn"]),
    ("Acme Corp | Crunchbase Company Profile", "Acme", ["| Crunchbase Company Profile", "Corp"]),
    ("Acme: Home", "Acme", [": Home"]),
    ("Home | Acme", "Acme", ["Home |"]),
    ("Acme™", "Acme", ["™"]),
    ("Acme® Inc.", "Acme", ["®", "Inc."]),
    # Whitespace, quotes and punctuation around the name.
    ("  Acme   Widgets  ", "Acme Widgets", []),
    ("Acme\u00a0Widgets\u200b", "Acme Widgets", []),
    ('"Acme, Inc."', "Acme", ["Inc."]),
    ("\u201cAcme\u201d", "Acme", []),
    ("'Acme Widgets'", "Acme Widgets", []),
    ("(Acme Corp)", "Acme", ["Corp"]),
    ("- Acme -", "Acme", []),
    ("Acme.", "Acme", []),
    ("Acme Widgets,", "Acme Widgets", []),
    ("Acme U.S.A.", "Acme U.S.A.", []),
    ("Yahoo!", "Yahoo!", []),
    ("Booking.com", "Booking.com", []),
    # Casing: mixed case is kept as typed; ALL-CAPS and all-lowercase are re-cased.
    ("eBay Inc.", "eBay", ["Inc."]),
    ("HubSpot, Inc", "HubSpot", ["Inc"]),
    ("iRobot Corporation", "iRobot", ["Corporation"]),
    ("McKinsey & Company", "McKinsey & Company", []),
    ("ACME CORP", "ACME", ["CORP"]),
    ("ACME WIDGETS LLC", "Acme Widgets", ["LLC"]),
    ("INTERNATIONAL BUSINESS MACHINES CORP", "International Business Machines", ["CORP"]),
    ("BANK OF AMERICA CORP", "Bank of America", ["CORP"]),
    ("JOHNSON & JOHNSON", "Johnson & Johnson", []),
    ("AT&T INC.", "AT&T", ["INC."]),
    ("IBM", "IBM", []),
    ("3M", "3M", []),
    ("HSBC HOLDINGS PLC", "HSBC Holdings", ["PLC"]),
    ("KPMG", "KPMG", []),
    ("7-ELEVEN, INC.", "7-Eleven", ["INC."]),
    ("BOOKING.COM", "Booking.com", []),
    ("U.S. STEEL CORP", "U.S. Steel", ["CORP"]),
    ("ACME HR SOLUTIONS", "Acme HR Solutions", []),
    ("MY PIZZA PLACE", "My Pizza Place", []),
    ("acme widgets inc", "Acme Widgets", ["inc"]),
    ("acme", "Acme", []),
    ("mcdonald's corporation", "McDonald's", ["corporation"]),
    ("o'reilly media", "O'Reilly Media", []),
    ("21st century fox", "21st Century Fox", []),
    ("hp inc", "HP", ["inc"]),
    ("3m company", "3M Company", []),
    ("bank of new york mellon corp", "Bank of New York Mellon", ["corp"]),
    ("procter & gamble co", "Procter & Gamble", ["co"]),
    ("société générale sa", "Société Générale", ["sa"]),
    ("ÉLECTRICITÉ DE FRANCE SA", "Électricité de France", ["SA"]),
    ("トヨタ自動車株式会社", "トヨタ自動車株式会社", []),
]


@pytest.mark.parametrize(("raw_name", "name", "removed"), CLEANED)
def test_cleans_name(raw_name: str, name: str, removed: list[str]) -> None:
    assert find_name({"name": raw_name}, {}) == {
        "name": name,
        "original_name": raw_name,
        "removed": removed,
        "source_field": "name",
    }


@pytest.mark.parametrize(
    ("row", "field", "name"),
    [
        ({"name": "Acme", "company_name": "Other"}, "name", "Acme"),
        ({"name": "", "company_name": "Acme Inc"}, "company_name", "Acme"),
        ({"name": "   ", "company": "Acme"}, "company", "Acme"),
        ({"name": None, "organization": "Acme"}, "organization", "Acme"),
        ({"name": "n/a", "account_name": "Acme"}, "account_name", "Acme"),
        ({"name": "N/A", "company": "Acme"}, "company", "Acme"),
        ({"name": "-", "company": "Acme"}, "company", "Acme"),
        ({"name": "Unknown", "company": "Acme"}, "company", "Acme"),
        ({"Company Name": "Acme"}, "Company Name", "Acme"),
    ],
)
def test_takes_first_usable_field(row: dict[str, Any], field: str, name: str) -> None:
    result = find_name(row, {})
    assert (result["source_field"], result["name"]) == (field, name)


REJECTED: list[tuple[dict[str, Any], str]] = [
    ({"name": "Inc."}, "no usable company name: name: company name 'Inc.' is only a legal form"),
    ({"name": "LLC"}, "company name 'LLC' is only a legal form, not a company name"),
    ({"name": "Co., Ltd."}, "company name 'Co., Ltd.' is only a legal form"),
    ({"name": "  , Inc. "}, "company name ', Inc.' is only a legal form"),
    ({"name": "???"}, "company name '???' has no letters or digits"),
    ({"name": "***"}, "has no letters or digits"),
    ({"name": "n/a"}, "no usable company name: name='n/a' is a placeholder"),
    (
        {"name": "null", "company": "-"},
        "name='null' is a placeholder; company='-' is a placeholder",
    ),
    ({"name": 12345}, "no usable company name: name=12345 is not text (int)"),
    (
        {"website": "acme.com", "email": "j@acme.com"},
        "no company name: no value in any of name, company_name, company, organization, "
        "account_name (row has: website, email)",
    ),
    ({}, "no company name: no value in any of name"),
    ({"name": "", "company_name": "  "}, "no company name: no value in any of name"),
]


@pytest.mark.parametrize(("row", "message"), REJECTED)
def test_rejects_with_specific_message(row: dict[str, Any], message: str) -> None:
    with pytest.raises(TerminalError) as info:
        find_name(row, {})
    assert message in str(info.value)


@pytest.mark.parametrize("bare", ["SAS", "AB", "SE"])
def test_a_bare_ambiguous_form_is_a_name(bare: str) -> None:
    assert find_name({"name": bare}, {})["name"] == bare


@pytest.mark.parametrize(
    ("config", "row", "name", "removed"),
    [
        ({}, {"name": "The Home Depot"}, "The Home Depot", []),
        (
            {"strip_leading_the": True},
            {"name": "The Home Depot, Inc."},
            "Home Depot",
            ["Inc.", "The"],
        ),
        ({"strip_leading_the": True}, {"name": "THE HOME DEPOT INC"}, "Home Depot", ["INC", "THE"]),
        ({"strip_leading_the": True}, {"name": "Theranos"}, "Theranos", []),
        (
            {"source_fields": ["account_name"]},
            {"name": "X", "account_name": "Acme Ltd"},
            "Acme",
            ["Ltd"],
        ),
        ({"source_fields": "org"}, {"org": "Acme GmbH"}, "Acme", ["GmbH"]),
    ],
)
def test_config(config: dict[str, Any], row: dict[str, Any], name: str, removed: list[str]) -> None:
    result = find_name(row, config)
    assert (result["name"], result["removed"]) == (name, removed)


@pytest.mark.parametrize(
    "config",
    [{"source_fields": []}, {"source_fields": [None]}, {"strip_leading_the": "yes"}],
)
def test_bad_config_is_a_configuration_error(config: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        find_name({"name": "Acme"}, config)


@pytest.mark.asyncio
async def test_handler_is_registered() -> None:
    assert HANDLERS["clean_company_name"] is clean_company_name
    result = await HANDLERS["clean_company_name"]({"company": "ACME WIDGETS, INC."}, _ctx())
    assert result == {
        "name": "Acme Widgets",
        "original_name": "ACME WIDGETS, INC.",
        "removed": ["INC."],
        "source_field": "company",
    }


@pytest.mark.asyncio
async def test_handler_raises_terminal_error() -> None:
    with pytest.raises(TerminalError, match="only a legal form"):
        await clean_company_name({"name": "Inc."}, _ctx())

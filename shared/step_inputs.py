"""What each built-in step reads from an item, declared so an import can check it before writing.

A CSV none of whose columns feeds a step would import fine and then fail on every item; with these
declarations the importer refuses it up front, naming what each step needs. A declaration is a
function of the step's registry config (its ``source_fields``, its ``needs``), keyed like
``shared.steps.HANDLERS`` by ``modal_function_name``; steps without one (the shells) read nothing.

The field lists here are the steps' own defaults: ``shared.steps.domains`` and ``.names`` take
their ``DEFAULT_SOURCE_FIELDS`` from this module, so a step and its declaration cannot drift
apart. This module stands outside the ``shared.steps`` package on purpose: importing that package
loads every handler with its HTTP client and settings (about 18 MB and 0.4 s), which the importer,
streaming a million rows in under 50 MB, has no use for.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shared.errors import ConfigurationError

# The fields normalize_domain tries, in order (and exa_verify / clay_enrich without its result).
DOMAIN_FIELDS = (
    "website",
    "domain",
    "company_domain",
    "url",
    "company_website",
    "homepage",
    "email",
    "work_email",
)
# The fields clean_company_name tries, in order (and exa_verify / clay_enrich without its result).
NAME_FIELDS = ("name", "company_name", "company", "organization", "account_name")
LINKEDIN_FIELDS = ("linkedin_url", "linkedin", "company_linkedin_url", "linkedin_company_url")


@dataclass(frozen=True, slots=True)
class StepInputs:
    """What a step reads: a value under any of ``fields`` (raw_data keys, compared as
    ``normalize_key`` compares them), or the result of any of ``steps`` (earlier steps it reads
    through ``config.needs``) when one runs before it. ``what`` says it in the user's words."""

    what: str
    fields: tuple[str, ...]
    steps: tuple[str, ...] = ()


# A step's registry config -> what it reads.
InputsOf = Callable[[Mapping[str, Any]], StepInputs]

_NON_ALNUM = re.compile(r"[^0-9a-z]+")


def normalize_key(key: str) -> str:
    """``"Company Website"`` -> ``"company_website"``: the form CSV headers are imported in."""
    return _NON_ALNUM.sub("_", key.strip().lower()).strip("_")


def config_fields(config: Mapping[str, Any], key: str, default: Sequence[str]) -> tuple[str, ...]:
    """An ordered list of input field names from the step config, e.g. ``source_fields``."""
    value = config.get(key)
    if value is None:
        return tuple(default)
    if isinstance(value, str):
        value = [value]
    if (
        not isinstance(value, Sequence)
        or not value
        or not all(isinstance(item, str) and item.strip() for item in value)
    ):
        raise ConfigurationError(
            f"config.{key} must be a non-empty list of field names, got {value!r}"
        )
    return tuple(item.strip() for item in value)


def needed_steps(config: Mapping[str, Any], readable: Sequence[str]) -> tuple[str, ...]:
    """Those of ``readable`` (the earlier steps a handler knows how to read) that the step's
    ``config.needs`` names: only their results reach the handler as ``ctx.inputs``."""
    needs = config.get("needs")
    names = needs if isinstance(needs, list) else []
    return tuple(step for step in readable if step in names)


def normalize_domain_inputs(config: Mapping[str, Any]) -> StepInputs:
    """``find_domain`` tries ``config.source_fields``, else the defaults."""
    fields = config_fields(config, "source_fields", DOMAIN_FIELDS)
    return StepInputs("a website, domain or email column", fields)


def clean_company_name_inputs(config: Mapping[str, Any]) -> StepInputs:
    """``find_name`` tries ``config.source_fields``, else the defaults."""
    fields = config_fields(config, "source_fields", NAME_FIELDS)
    return StepInputs("a company name column", fields)


def exa_verify_inputs(config: Mapping[str, Any]) -> StepInputs:
    """A domain is required (an item without one fails before Exa is paid); the name only
    sharpens the query. The domain is normalize_domain's result when the config needs it, else
    the row's own fields by ``find_domain``'s defaults (exa_verify passes it no config)."""
    return StepInputs(
        "a website, domain or email column",
        DOMAIN_FIELDS,
        needed_steps(config, ("normalize_domain",)),
    )


def clay_enrich_inputs(config: Mapping[str, Any]) -> StepInputs:
    """Any of a name, a domain or a LinkedIn URL is something to enrich (``clay_row``); the name
    and the domain may come from the earlier steps the config needs."""
    return StepInputs(
        "a company name, website, domain, email or LinkedIn column",
        (*NAME_FIELDS, *DOMAIN_FIELDS, *LINKEDIN_FIELDS),
        needed_steps(config, ("clean_company_name", "normalize_domain")),
    )


INPUTS: dict[str, InputsOf] = {
    "normalize_domain": normalize_domain_inputs,
    "clean_company_name": clean_company_name_inputs,
    "exa_verify": exa_verify_inputs,
    "clay_enrich": clay_enrich_inputs,
}

__all__ = [
    "DOMAIN_FIELDS",
    "INPUTS",
    "LINKEDIN_FIELDS",
    "NAME_FIELDS",
    "InputsOf",
    "StepInputs",
    "config_fields",
    "needed_steps",
    "normalize_key",
]

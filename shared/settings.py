"""Settings from the environment (pydantic-settings), read once per process by ``get_settings()``.

Nothing is required: with no ``DATABASE_URL`` the project runs on its private PostgreSQL cluster
under ``enrich_home``. The database URL is a ``SecretStr`` so it never lands in a log or a
traceback; use ``mask_dsn()`` (or ``Settings.database_url_masked``) to show it.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit
from uuid import UUID

from pydantic import AliasChoices, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.errors import ConfigurationError

NIL_UUID = UUID(int=0)
MASK = "***"

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


def default_enrich_home() -> Path:
    """Where the private cluster and other local state live when ``ENRICH_HOME`` is unset.

    As root the cluster runs as the ``postgres`` OS user, which cannot traverse ``/root``: use
    ``/var/lib/enrich`` there. Otherwise follow the XDG base directory spec.
    """
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/var/lib/enrich")
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "enrich"


class Settings(BaseSettings):
    """The process's configuration; every field has a default."""

    model_config = SettingsConfigDict(
        env_ignore_empty=True,
        populate_by_name=True,
        extra="ignore",
        frozen=True,
    )

    database_url: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("DATABASE_URL", "database_url"),
        description="External PostgreSQL (e.g. Supabase). Unset: use the private cluster.",
    )
    enrich_home: Path = Field(
        default_factory=default_enrich_home,
        validation_alias=AliasChoices("ENRICH_HOME", "enrich_home"),
    )
    pg_bin_dir: Path | None = Field(
        default=None,
        validation_alias=AliasChoices("ENRICH_PG_BIN", "pg_bin_dir"),
        description="Directory holding initdb, pg_ctl and postgres.",
    )
    client_id: UUID = Field(
        default=NIL_UUID,
        validation_alias=AliasChoices("ENRICH_CLIENT_ID", "client_id"),
    )
    modal_app_name: str = Field(
        default="enrichment-workers",
        validation_alias=AliasChoices("ENRICH_MODAL_APP", "modal_app_name"),
        description="The deployed Modal app whose functions run the steps (modal_app/app.py).",
    )
    step_modules: str = Field(
        default="",
        validation_alias=AliasChoices("ENRICH_STEP_MODULES", "step_modules"),
        description="Comma-separated modules whose HANDLERS dict adds step handlers.",
    )
    db_outage_seconds: float = Field(
        default=300.0,
        gt=0,
        validation_alias=AliasChoices("ENRICH_DB_OUTAGE_SECONDS", "db_outage_seconds"),
        description="How long `enrich run` rides out an unreachable database (a restart, a "
        "failover) before it stops with its resume command. `enrich serve` never gives up.",
    )
    callback_secret: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("ENRICH_CALLBACK_SECRET", "callback_secret"),
        description="Signs ASYNC callback tokens (>= 32 bytes). Unset: a key file in enrich_home.",
    )
    callback_secret_previous: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "ENRICH_CALLBACK_SECRET_PREVIOUS", "callback_secret_previous"
        ),
        description="The key before the last rotation: tokens it signed still verify.",
    )
    callback_base_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("ENRICH_CALLBACK_BASE_URL", "callback_base_url"),
        description="Where providers reach the callback receiver (a tunnel to the local one, the "
        "deployed endpoint); unset: http://127.0.0.1:<port> of the local receiver.",
    )
    log_level: LogLevel = Field(
        default="INFO",
        validation_alias=AliasChoices("ENRICH_LOG_LEVEL", "LOG_LEVEL", "log_level"),
    )
    supabase_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("SUPABASE_URL", "supabase_url"),
        description="The Supabase project (https://<ref>.supabase.co). With the service-role key "
        "set too, the State API goes through its REST endpoint (the Modal workers' way).",
    )
    supabase_service_role_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("SUPABASE_SERVICE_ROLE_KEY", "supabase_service_role_key"),
        description="The project's service-role key (Modal secret enrichment-supabase).",
    )

    @property
    def database_dsn(self) -> str | None:
        """The external database URL in clear text (for connecting only, never for printing)."""
        return self.database_url.get_secret_value() if self.database_url is not None else None

    @property
    def database_url_masked(self) -> str | None:
        """The external database URL with its password replaced by ``***``."""
        dsn = self.database_dsn
        return mask_dsn(dsn) if dsn is not None else None


_KV_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def mask_dsn(dsn: str) -> str:
    """Return ``dsn`` with any password replaced by ``***``.

    Handles URIs (``postgresql://user:secret@host/db?password=...``) and libpq key/value strings
    (``host=... password=secret``).
    """
    if "://" not in dsn:
        return _KV_PASSWORD.sub(lambda m: m.group(1) + MASK, dsn)
    parts = urlsplit(dsn)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostinfo = netloc.rpartition("@")
        if ":" in userinfo:
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}:{MASK}@{hostinfo}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() == "password" for k, _ in pairs):
            masked = [(k, MASK if k.lower() == "password" else v) for k, v in pairs]
            query = urlencode(masked, safe="/*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment once (``get_settings.cache_clear()`` to
    re-read, e.g. in tests). A bad value is a ConfigurationError naming the variable and what is
    wrong with it, never echoing the value (it may be a secret)."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in exc.errors()
        )
        raise ConfigurationError(f"bad setting: {problems}") from None

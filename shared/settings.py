"""Settings from the environment (pydantic-settings), read once per process by ``get_settings()``.

Nothing is required: with no ``DATABASE_URL`` the project runs on its private PostgreSQL cluster
under ``enrich_home``. The database URL is a ``SecretStr`` so it never lands in a log or a
traceback; use ``mask_dsn()`` (or ``Settings.database_url_masked``) to show it.
"""

from __future__ import annotations

import errno
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit
from uuid import UUID

import psycopg
from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.errors import ConfigurationError

NIL_UUID = UUID(int=0)
MASK = "***"

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]

# Hosts a credential may reach over plain http: this machine only (dev stand-ins, tests).
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})

# What a DATABASE_URL looks like, for every message about a bad or unreachable one. Supabase
# users paste the project's API URL (https://<ref>.supabase.co) where the database's connection
# string belongs: name both.
DATABASE_URL_HINT = (
    "a valid one looks like postgresql://user:password@host:5432/postgres (for Supabase: the "
    "connection string from the project's Connect dialog, not its https://<ref>.supabase.co API "
    "URL)"
)


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
        # A ValidationError would otherwise quote the raw input: a DATABASE_URL with its password.
        hide_input_in_errors=True,
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
    modal_environment: str | None = Field(
        default=None,
        validation_alias=AliasChoices("MODAL_ENVIRONMENT", "modal_environment"),
        description="The Modal environment the app is deployed in (deploy.sh sets it, `main` by "
        "default). The conductor looks its functions up there explicitly: unset, Modal falls "
        "back to the profile's or the workspace's default, which need not be where deploy.sh "
        "deployed.",
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

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_case_level(cls, value: object) -> object:
        # `info` means INFO: Python's logging levels are upper case, people's typing is not.
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("callback_base_url")
    @classmethod
    def _http_callback_base_url(cls, value: str | None) -> str | None:
        # Providers POST to <this>/callbacks/...: anything but an http(s) URL fails only later,
        # on every ASYNC item, at the provider's end.
        if value:
            scheme, host = _scheme_and_host(value)
            if not host or scheme not in ("https", "http"):
                raise ValueError(
                    "is not an http(s) URL: give where providers reach the callback receiver, "
                    "e.g. https://callbacks.example.com"
                )
        return value

    @field_validator("database_url")
    @classmethod
    def _parsable_dsn(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and value.get_secret_value():
            check_dsn(value.get_secret_value(), "DATABASE_URL")
        return value

    @field_validator("supabase_url")
    @classmethod
    def _https_supabase_url(cls, value: str | None) -> str | None:
        if value:
            try:
                require_https(value, "SUPABASE_URL")
            except ConfigurationError as exc:  # pydantic reports ValueErrors
                raise ValueError(str(exc)) from None
        return value

    @property
    def database_dsn(self) -> str | None:
        """The external database URL in clear text (for connecting only, never for printing)."""
        return self.database_url.get_secret_value() if self.database_url is not None else None

    @property
    def database_url_masked(self) -> str | None:
        """The external database URL with its password replaced by ``***``."""
        dsn = self.database_dsn
        return mask_dsn(dsn) if dsn is not None else None


# libpq's secret parameters: the password, and the passphrase of the client's SSL key.
_SECRET_KEYS = frozenset({"password", "sslpassword"})
_KV_PASSWORD = re.compile(r"(\b(?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
# What libpq quotes in a parse error is a piece of the DSN, possibly of the password:
# `invalid percent-encoded token: "s3cr%ZZet"`.
_QUOTED = re.compile(r'"[^"]*"')


_URL_SCHEME = re.compile(r"^\s*([A-Za-z][A-Za-z0-9+.-]*)://")
_PG_SCHEMES = frozenset({"postgresql", "postgres"})


def check_dsn(dsn: str, name: str) -> None:
    """Raise ``ValueError`` unless ``dsn`` is a PostgreSQL connection string libpq can parse: a
    ``postgresql://`` (or ``postgres://``) URL or a ``key=value`` string. The message says what a
    valid one looks like and never quotes the DSN.

    Checked here, once, so a malformed URL stops at startup with a clean message instead of
    reaching psycopg's pool, which logs libpq's error (quoting the bad token, often the password)
    on every reconnect attempt. The scheme is checked first: libpq reads anything without a
    postgresql:// prefix as key=value text, so a pasted https:// URL gets "missing '=' after ...".
    """
    scheme = _URL_SCHEME.match(dsn)
    if scheme is not None and scheme.group(1).lower() not in _PG_SCHEMES:
        raise ValueError(
            f"{name} is an {scheme.group(1).lower()}:// URL, not a PostgreSQL connection string: "
            f"{DATABASE_URL_HINT}"
        )
    try:
        psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.Error as exc:
        if scheme is None:  # neither a URL nor key=value text: "missing "=" after ..."
            raise ValueError(
                f"{name} is neither a postgresql:// URL nor key=value connection text: "
                f"{DATABASE_URL_HINT}"
            ) from None
        reason = _QUOTED.sub('"***"', str(exc).strip().splitlines()[0] if str(exc) else "")
        raise ValueError(
            f"{name} is not a valid PostgreSQL connection string ({reason}); in a URL, "
            "percent-encode special characters of the user and password (% as %25, @ as %40)"
        ) from None


def require_https(url: str, name: str) -> str:
    """``url`` when it is https, or http to this machine (localhost, 127.0.0.1, ::1).

    The URLs this guards carry credentials with every request (the service-role key, an API key,
    a webhook URL that is itself a secret): over plain http they could be read on the way. The
    ConfigurationError names the variable, never the value (it may be the credential).
    """
    scheme, host = _scheme_and_host(url)
    if not host or scheme not in ("https", "http"):
        raise ConfigurationError(f"{name} is not an http(s) URL")
    if scheme == "http" and host not in LOCAL_HOSTS:
        raise ConfigurationError(
            f"{name} must be an https:// URL: plain http:// is accepted only for localhost, "
            "127.0.0.1 and ::1 (the credentials sent with each request would cross the network "
            "unencrypted)"
        )
    return url


def _scheme_and_host(url: str) -> tuple[str, str | None]:
    """``url``'s scheme (lower case) and host; ``("", None)`` when it does not parse."""
    try:
        parts = urlsplit(url)
        return parts.scheme.lower(), parts.hostname
    except ValueError:  # a malformed IPv6 host, say
        return "", None


def mask_dsn(dsn: str) -> str:
    """Return ``dsn`` with any password (and ``sslpassword``) replaced by ``***``.

    Handles URIs (``postgresql://user:secret@host/db?password=...``) and libpq key/value strings
    (``host=... password=secret sslpassword=...``).
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
        if any(k.lower() in _SECRET_KEYS for k, _ in pairs):
            masked = [(k, MASK if k.lower() in _SECRET_KEYS else v) for k, v in pairs]
            query = urlencode(masked, safe="/*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


# What a valid value of each typed setting looks like, for the message about a bad one (pydantic's
# own says "Input should be a valid UUID, invalid character: found `m` at 2", quoting the value).
VALID_VALUES = {
    "client_id": "a UUID such as 123e4567-e89b-12d3-a456-426614174000 (the tenant's id)",
    "db_outage_seconds": "a number of seconds greater than 0, such as 300",
    "log_level": "one of DEBUG, INFO, WARNING, ERROR, CRITICAL",
    "enrich_home": "a directory path",
    "pg_bin_dir": "the directory holding initdb, pg_ctl and postgres",
}


def _field_of(variable: str) -> str | None:
    """The Settings field an environment variable (one of its aliases) sets."""
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
        if any(str(c).lower() == variable.lower() for c in choices) or name == variable:
            return name
    return None


def describe_error(error: ErrorDetails) -> str:
    """``VARIABLE: what is wrong`` for one pydantic error, naming what a valid value is and never
    quoting the value (``hide_input_in_errors`` keeps pydantic's part clean of it too)."""
    variable = ".".join(str(part) for part in error["loc"])
    if error["type"] == "value_error":  # one of our validators: its message says it all
        text = str(error.get("ctx", {}).get("error", error["msg"]))
        return f"{variable}: {text.removeprefix(variable + ' ')}"
    field = _field_of(variable)
    valid = VALID_VALUES.get(field) if field is not None else None
    return f"{variable}: must be {valid}" if valid else f"{variable}: {error['msg']}"


def ensure_home(path: Path) -> Path:
    """Create ``ENRICH_HOME`` (and its parents) unless it exists; return it.

    A ConfigurationError naming ENRICH_HOME, the path and the reason when it cannot be used: a
    file where a directory belongs, no permission, a file system that holds no files (/proc).
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise home_error(path, exc) from None
    # Root passes every permission check, but then the first file written says it (home_error).
    if not os.access(path, os.W_OK | os.X_OK):
        raise home_error(path, PermissionError(errno.EACCES, "Permission denied", str(path)))
    return path


def home_error(home: Path, exc: OSError) -> ConfigurationError:
    """The one-line ConfigurationError for ``exc``, raised while making or writing in ``home``."""
    where = Path(exc.filename) if isinstance(exc.filename, str) else home
    if isinstance(exc, (FileExistsError, NotADirectoryError)):
        blocker = next((p for p in (home, *home.parents) if p.exists() and not p.is_dir()), where)
        reason = f"{blocker} is a file, not a directory"
    elif exc.errno == errno.ENOENT and where.parent.is_dir():
        # ENOENT with the parent there: a virtual file system refusing new files.
        reason = f"cannot create {where}: its file system (like /proc or /sys) holds no such file"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        verb = "write in" if where.is_dir() else "create"
        reason = f"no permission to {verb} {where}"
    elif exc.errno == errno.EROFS:
        reason = f"{where} is on a read-only file system"
    else:
        reason = f"cannot create or write {where}: {exc.strerror or exc}"
    return ConfigurationError(
        f"ENRICH_HOME={home} cannot be used: {reason}; set ENRICH_HOME to a directory you can "
        f"write (unset, it is {default_enrich_home()})"
    )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment once (``get_settings.cache_clear()`` to
    re-read, e.g. in tests). A bad value is a ConfigurationError naming the variable and what a
    valid one is, never echoing the value (it may be a secret)."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(describe_error(error) for error in exc.errors())
        raise ConfigurationError(f"bad setting: {problems}") from None

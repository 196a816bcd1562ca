"""The callback token: a provider's answer is accepted only for the attempt it was sent for.

``v1.<payload>.<signature>``, both base64url without padding. The payload is compact JSON: batch,
item, step, attempt, expiry (unix seconds) and the id of the key that signed it; the signature is
HMAC-SHA256 over ``v1.<payload>``. Two keys verify (the current and the previous one), so a key can
be rotated while callbacks signed with the old one are still out. Comparison is constant-time.

Keys come from ``ENRICH_CALLBACK_SECRET`` / ``ENRICH_CALLBACK_SECRET_PREVIOUS`` (at least 32
bytes), never from the database or a migration. With none set (the zero-configuration embedded
default), a random key is kept in ``$ENRICH_HOME/callback.key`` (0600).

A token is a bearer credential for one attempt: nothing here logs it, and no error repeats it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from uuid import UUID

from pydantic import SecretStr

from shared.errors import ConfigurationError, TerminalError
from shared.settings import Settings, home_error
from shared.state_api import TaskRef

VERSION = "v1"
MIN_KEY_BYTES = 32
KEY_FILE = "callback.key"
# A token outlives any callback deadline worth having; a later answer is stale anyway (409).
TOKEN_TTL = timedelta(days=7)
# A real token is about 250 characters; refusing long ones bounds the work done before the
# signature is checked (the payload is parsed first, to find its key id).
MAX_TOKEN_CHARS = 2048
# Unpadded base64url, strictly: the lenient decoder skips stray characters, so two different
# strings would decode to one signature.
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


class InvalidToken(TerminalError):
    """Malformed, forged, or signed with a key we do not hold."""


class ExpiredToken(TerminalError):
    """Well signed, but past its expiry."""


@dataclass(frozen=True)
class CallbackKeys:
    """The signing key and the previous one (still accepted). Never shown in a repr."""

    current: bytes = field(repr=False)
    previous: bytes | None = field(default=None, repr=False)

    def by_id(self, key_id: str) -> bytes | None:
        """The key whose id is ``key_id`` (compared in constant time), or None."""
        wanted = key_id.encode("utf-8", "replace")  # compare_digest refuses non-ASCII str
        found = None
        for key in (self.current, self.previous):
            if key is not None and hmac.compare_digest(_key_id(key).encode(), wanted):
                found = key
        return found


def _key_id(key: bytes) -> str:
    """A short, public name for a key: a hash of it, so it reveals nothing of the key."""
    return hashlib.sha256(b"enrich-callback-key-id:" + key).hexdigest()[:12]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not _B64URL.fullmatch(text):
        raise InvalidToken("a callback token that is not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, binascii.Error):
        raise InvalidToken("a callback token that is not base64url") from None


def _mac(key: bytes, signed: str) -> bytes:
    return hmac.new(key, signed.encode("ascii"), hashlib.sha256).digest()


def _aware(moment: datetime, name: str) -> datetime:
    # A naive datetime would be read in the machine's local zone: a token expiring hours off.
    if moment.tzinfo is None:
        raise ValueError(f"{name} must be timezone-aware")
    return moment


def sign(task: TaskRef, keys: CallbackKeys, *, expires_at: datetime) -> str:
    """A token for ``task`` (one attempt), valid until ``expires_at``, signed with the current
    key."""
    payload = {
        "b": str(task.batch_id),
        "i": str(task.item_id),
        "s": task.step_name,
        "a": task.attempt,
        "e": int(_aware(expires_at, "expires_at").timestamp()),
        "k": _key_id(keys.current),
    }
    body = _b64(json.dumps(payload, separators=(",", ":")).encode())
    signed = f"{VERSION}.{body}"
    return f"{signed}.{_b64(_mac(keys.current, signed))}"


def verify(token: str, keys: CallbackKeys, *, now: datetime | None = None) -> TaskRef:
    """The attempt ``token`` was signed for. Raises InvalidToken (malformed, forged, unknown key)
    or ExpiredToken (well signed, too late)."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
        raise InvalidToken("not a callback token")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != VERSION:
        raise InvalidToken("not a callback token")
    raw_payload, signature = _unb64(parts[1]), _unb64(parts[2])
    try:
        payload: Any = json.loads(raw_payload)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise InvalidToken("a callback token whose payload is not JSON") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("k"), str):
        raise InvalidToken("a callback token without a key id")
    key = keys.by_id(payload["k"])
    if key is None:
        raise InvalidToken("a callback token signed with an unknown key")
    if not hmac.compare_digest(_mac(key, f"{parts[0]}.{parts[1]}"), signature):
        raise InvalidToken("a callback token with a bad signature")
    task, expiry = _fields(payload)
    moment = datetime.now(timezone.utc) if now is None else _aware(now, "now")
    if moment.timestamp() >= expiry:
        raise ExpiredToken("the callback token has expired")
    return task


def _fields(payload: dict[str, Any]) -> tuple[TaskRef, int]:
    """The signed fields, type-checked: a key holder's bug must not become a TypeError later."""
    attempt, expiry = payload.get("a"), payload.get("e")
    batch, item, step = payload.get("b"), payload.get("i"), payload.get("s")
    if (
        isinstance(attempt, int)
        and not isinstance(attempt, bool)
        and attempt >= 1
        and isinstance(expiry, int)
        and not isinstance(expiry, bool)
        and isinstance(batch, str)
        and isinstance(item, str)
        and isinstance(step, str)
        and step
    ):
        try:
            return TaskRef(UUID(batch), UUID(item), step, attempt), expiry
        except ValueError:
            pass
    raise InvalidToken("a callback token with missing or malformed fields")


def load_keys(settings: Settings) -> CallbackKeys:
    """The configured keys, or the private key file of the embedded default."""
    current = _secret(settings.callback_secret, "ENRICH_CALLBACK_SECRET")
    previous = _secret(settings.callback_secret_previous, "ENRICH_CALLBACK_SECRET_PREVIOUS")
    if current is None:
        if previous is not None:
            raise ConfigurationError(
                "ENRICH_CALLBACK_SECRET_PREVIOUS is set without ENRICH_CALLBACK_SECRET"
            )
        try:
            current = _key_file(settings.enrich_home / KEY_FILE)
        except OSError as exc:  # ENRICH_HOME is a file, unwritable, on /proc...: say which
            raise home_error(settings.enrich_home, exc) from None
    return CallbackKeys(current, previous)


def _secret(value: SecretStr | None, name: str) -> bytes | None:
    if value is None:
        return None
    raw = value.get_secret_value().encode()
    if len(raw) < MIN_KEY_BYTES:
        # The length is not secret enough to matter; the value never appears.
        raise ConfigurationError(
            f"{name} must be at least {MIN_KEY_BYTES} bytes long (it has {len(raw)}); "
            f'make one with: python -c "import secrets; print(secrets.token_urlsafe(32))"'
        )
    return raw


def _key_file(path: Path) -> bytes:
    """A random key kept in ``path`` (0600), created once even if processes race: each writes a
    private temporary file, and the first to hard-link it into place wins."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(MIN_KEY_BYTES) + "\n")
                fh.flush()
                os.fsync(fh.fileno())  # never a linked but empty key file after a crash
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process got there first: theirs wins
        finally:
            tmp.unlink(missing_ok=True)
    return _read_key_file(path)


def _read_key_file(path: Path) -> bytes:
    if os.stat(path).st_mode & 0o077:
        raise ConfigurationError(
            f"{path} is readable by other users: chmod 600 it, or delete it to make a new key"
        )
    try:
        key = bytes.fromhex(path.read_text().strip())
    except ValueError:
        key = b""
    if len(key) < MIN_KEY_BYTES:
        raise ConfigurationError(
            f"{path} does not hold a key of {MIN_KEY_BYTES} bytes (hex): "
            "delete it to make a new one"
        )
    return key


def configured_keys(settings: Settings) -> CallbackKeys:
    """The keys from the environment, never the key file: for a receiver and workers that run in
    separate containers (Modal), where a key file would be a different random key in each, and
    every callback would be refused as forged."""
    if settings.callback_secret is None:
        raise ConfigurationError(
            "ENRICH_CALLBACK_SECRET is not set: the workers sign callback URLs with it and the "
            "receiver verifies them, so both need the same value (deploy.sh puts it in the Modal "
            "secret)"
        )
    return load_keys(settings)


def callback_urls(
    base_url: str, keys: CallbackKeys, ttl: timedelta = TOKEN_TTL
) -> Callable[[TaskRef], str]:
    """The function that gives each attempt its callback URL under ``base_url``, valid ``ttl``."""
    base = base_url.rstrip("/")

    def url(task: TaskRef) -> str:
        return f"{base}/callbacks/{sign(task, keys, expires_at=datetime.now(timezone.utc) + ttl)}"

    return url

"""The callback token: a provider's answer is accepted only for the attempt it was sent for.

``v1.<payload>.<signature>``, both base64url without padding. The payload is compact JSON: batch,
item, step, attempt, expiry (unix seconds) and the id of the key that signed it; the signature is
HMAC-SHA256 over ``v1.<payload>``. Two keys verify (the current and the previous one), so a key can
be rotated while callbacks signed with the old one are still out. Comparison is constant-time.

Keys come from ``ENRICH_CALLBACK_SECRET`` / ``ENRICH_CALLBACK_SECRET_PREVIOUS`` (at least 32
bytes), never from the database or a migration. With none set (the zero-configuration embedded
default), a random key is kept in ``$ENRICH_HOME/callback.key`` (0600).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from uuid import UUID

from shared.errors import ConfigurationError, EnrichError
from shared.settings import Settings
from shared.state_api import TaskRef

VERSION = "v1"
MIN_KEY_BYTES = 32
KEY_FILE = "callback.key"


class InvalidToken(EnrichError):
    """Malformed, forged, or signed with a key we do not hold."""


class ExpiredToken(EnrichError):
    """Well signed, but past its expiry."""


@dataclass(frozen=True)
class CallbackKeys:
    """The signing key and the previous one (still accepted). Never shown in a repr."""

    current: bytes = field(repr=False)
    previous: bytes | None = field(default=None, repr=False)

    def by_id(self, key_id: str) -> bytes | None:
        for key in (self.current, self.previous):
            if key is not None and hmac.compare_digest(_key_id(key), key_id):
                return key
        return None


def _key_id(key: bytes) -> str:
    return hashlib.sha256(b"enrich-callback-key-id:" + key).hexdigest()[:12]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, signed: str) -> bytes:
    return hmac.new(key, signed.encode("ascii"), hashlib.sha256).digest()


def sign(task: TaskRef, keys: CallbackKeys, *, expires_at: datetime) -> str:
    payload = {
        "b": str(task.batch_id),
        "i": str(task.item_id),
        "s": task.step_name,
        "a": task.attempt,
        "e": int(expires_at.timestamp()),
        "k": _key_id(keys.current),
    }
    body = _b64(json.dumps(payload, separators=(",", ":")).encode())
    signed = f"{VERSION}.{body}"
    return f"{signed}.{_b64(_mac(keys.current, signed))}"


def verify(token: str, keys: CallbackKeys, *, now: datetime | None = None) -> TaskRef:
    """The attempt ``token`` was signed for. Raises InvalidToken or ExpiredToken."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != VERSION:
        raise InvalidToken("not a callback token")
    signed = f"{parts[0]}.{parts[1]}"
    try:
        payload: Any = json.loads(_unb64(parts[1]))
        signature = _unb64(parts[2])
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidToken("a callback token that does not decode") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("k"), str):
        raise InvalidToken("a callback token without a key id")
    key = keys.by_id(payload["k"])
    if key is None or not hmac.compare_digest(_mac(key, signed), signature):
        raise InvalidToken("a callback token with a bad signature")
    task, expiry = _fields(payload)
    moment = now or datetime.now(timezone.utc)
    if moment.timestamp() > expiry:
        raise ExpiredToken("the callback token has expired")
    return task


def _fields(payload: dict[str, Any]) -> tuple[TaskRef, int]:
    try:
        attempt, expiry = payload["a"], payload["e"]
        if not isinstance(attempt, int) or not isinstance(expiry, int) or attempt < 1:
            raise TypeError
        task = TaskRef(UUID(payload["b"]), UUID(payload["i"]), str(payload["s"]), attempt)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise InvalidToken("a callback token with missing or malformed fields") from None
    return task, expiry


def load_keys(settings: Settings) -> CallbackKeys:
    """The configured keys, or the private key file of the embedded default."""
    current = _secret(settings.callback_secret, "ENRICH_CALLBACK_SECRET")
    previous = _secret(settings.callback_secret_previous, "ENRICH_CALLBACK_SECRET_PREVIOUS")
    if current is None:
        if previous is not None:
            raise ConfigurationError(
                "ENRICH_CALLBACK_SECRET_PREVIOUS is set without ENRICH_CALLBACK_SECRET"
            )
        current = _key_file(settings.enrich_home / KEY_FILE)
    return CallbackKeys(current, previous)


def _secret(value: Any, name: str) -> bytes | None:
    if value is None:
        return None
    raw = value.get_secret_value().encode()
    if len(raw) < MIN_KEY_BYTES:
        raise ConfigurationError(f"{name} must be at least {MIN_KEY_BYTES} bytes long")
    return bytes(raw)


def _key_file(path: Path) -> bytes:
    """A random key kept in ``path`` (0600), created once even if processes race."""
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(MIN_KEY_BYTES))
    try:
        os.link(tmp, path)  # fails if another process got there first: theirs wins
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return bytes.fromhex(path.read_text().strip())

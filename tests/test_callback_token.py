"""The callback token (issue 7, item 2): bound to one attempt, signed, rotated, and strict about
everything else. No database: tokens are pure functions of a key."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import multiprocessing
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from pydantic import SecretStr

from shared.callbacks.token import (
    KEY_FILE,
    CallbackKeys,
    ExpiredToken,
    InvalidToken,
    load_keys,
    sign,
    verify,
)
from shared.errors import ConfigurationError
from shared.settings import Settings
from shared.state_api import TaskRef

KEY = b"k" * 32
OLD_KEY = b"o" * 32
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)
LATER = NOW + timedelta(hours=1)


def a_task(attempt: int = 2) -> TaskRef:
    return TaskRef(uuid4(), uuid4(), "clay_enrich", attempt)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def signed_with(key: bytes, payload: bytes) -> str:
    """A token with a valid signature over any payload: what a key holder's bug could produce,
    so the field checks are reached, not just the signature check."""
    body = f"v1.{b64(payload)}"
    return f"{body}.{b64(hmac.new(key, body.encode(), hashlib.sha256).digest())}"


def payload_of(token: str) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(unb64(token.split(".")[1]))
    return decoded


# Signing and verifying ---------------------------------------------------------------------------


def test_round_trip_and_format() -> None:
    keys = CallbackKeys(KEY)
    task = a_task()
    token = sign(task, keys, expires_at=LATER)
    assert verify(token, keys, now=NOW) == task
    version, payload, signature = token.split(".")
    assert version == "v1"
    assert "=" not in token and "+" not in token and "/" not in token  # base64url, no padding
    assert b" " not in unb64(payload)  # compact JSON
    assert payload_of(token)["a"] == 2 and payload_of(token)["e"] == int(LATER.timestamp())
    assert len(unb64(signature)) == 32  # HMAC-SHA256
    soon = datetime.now(timezone.utc) + timedelta(minutes=5)
    assert verify(sign(task, keys, expires_at=soon), keys) == task  # now defaults to the clock


def test_each_attempt_has_its_own_token() -> None:
    keys = CallbackKeys(KEY)
    task = a_task(attempt=1)
    second = TaskRef(task.batch_id, task.item_id, task.step_name, 2)
    assert verify(sign(second, keys, expires_at=LATER), keys, now=NOW).attempt == 2
    assert sign(task, keys, expires_at=LATER) != sign(second, keys, expires_at=LATER)


def test_a_tampered_payload_is_refused() -> None:
    keys = CallbackKeys(KEY)
    token = sign(a_task(attempt=1), keys, expires_at=LATER)
    version, _, signature = token.split(".")
    payload = payload_of(token)
    for field, value in [("a", 2), ("e", payload["e"] + 3600), ("s", "other"), ("b", str(uuid4()))]:
        changed = b64(json.dumps({**payload, field: value}, separators=(",", ":")).encode())
        with pytest.raises(InvalidToken, match="bad signature"):
            verify(f"{version}.{changed}.{signature}", keys, now=NOW)


def test_a_tampered_signature_is_refused() -> None:
    keys = CallbackKeys(KEY)
    version, payload, signature = sign(a_task(), keys, expires_at=LATER).split(".")
    raw = bytearray(unb64(signature))
    for i in (0, 31):
        flipped = bytearray(raw)
        flipped[i] ^= 1
        with pytest.raises(InvalidToken, match="bad signature"):
            verify(f"{version}.{payload}.{b64(bytes(flipped))}", keys, now=NOW)
    with pytest.raises(InvalidToken):  # truncated
        verify(f"{version}.{payload}.{b64(bytes(raw[:16]))}", keys, now=NOW)
    with pytest.raises(InvalidToken):  # empty
        verify(f"{version}.{payload}.", keys, now=NOW)


def test_a_token_signed_with_another_key_is_refused() -> None:
    token = sign(a_task(), CallbackKeys(b"x" * 32), expires_at=LATER)
    with pytest.raises(InvalidToken, match="unknown key"):
        verify(token, CallbackKeys(KEY), now=NOW)
    # Claiming our key id does not help without our key.
    forged = signed_with(
        b"x" * 32,
        json.dumps(payload_of(sign(a_task(), CallbackKeys(KEY), expires_at=LATER))).encode(),
    )
    with pytest.raises(InvalidToken, match="bad signature"):
        verify(forged, CallbackKeys(KEY), now=NOW)


def test_rotation_the_previous_key_still_verifies() -> None:
    task = a_task()
    old_token = sign(task, CallbackKeys(OLD_KEY), expires_at=LATER)  # out before the rotation
    rotated = CallbackKeys(KEY, previous=OLD_KEY)
    assert verify(old_token, rotated, now=NOW) == task  # the old key lives only in "previous"
    new_token = sign(task, rotated, expires_at=LATER)
    assert payload_of(new_token)["k"] != payload_of(old_token)["k"]  # signed with the new key
    assert verify(new_token, rotated, now=NOW) == task
    # The next rotation drops the old key: its tokens stop verifying, the newer ones still do.
    again = CallbackKeys(b"n" * 32, previous=KEY)
    with pytest.raises(InvalidToken):
        verify(old_token, again, now=NOW)
    assert verify(new_token, again, now=NOW) == task


def test_expiry() -> None:
    keys = CallbackKeys(KEY)
    token = sign(a_task(), keys, expires_at=LATER)
    assert verify(token, keys, now=LATER - timedelta(seconds=1))
    for moment in (LATER, LATER + timedelta(days=1)):
        with pytest.raises(ExpiredToken):
            verify(token, keys, now=moment)
    past = sign(a_task(), keys, expires_at=datetime.now(timezone.utc) - timedelta(seconds=1))
    with pytest.raises(ExpiredToken):
        verify(past, keys)
    # A forged token is refused as forged, whatever its expiry says.
    with pytest.raises(InvalidToken):
        verify(sign(a_task(), CallbackKeys(OLD_KEY), expires_at=NOW), keys, now=LATER)


def test_naive_datetimes_are_refused() -> None:
    keys = CallbackKeys(KEY)
    with pytest.raises(ValueError, match="timezone-aware"):
        sign(a_task(), keys, expires_at=datetime(2030, 1, 1))
    token = sign(a_task(), keys, expires_at=LATER)
    with pytest.raises(ValueError, match="timezone-aware"):
        verify(token, keys, now=datetime(2030, 1, 1))


def good_payload(**change: Any) -> dict[str, Any]:
    payload = payload_of(sign(a_task(), CallbackKeys(KEY), expires_at=LATER))
    payload.update(change)
    return {k: v for k, v in payload.items() if v is not None}


@pytest.mark.parametrize(
    "token",
    [
        "",
        "v1",
        "v1.",
        "v1..",
        "v1.a.b.c",
        "v1.a.b.c.d",
        "v2.e30.AAAA",
        "V1.e30.AAAA",
        ".e30.AAAA",
        "v1.!!.AAAA",  # not base64url
        "v1.e30=.AAAA",  # padded
        "v1.e3+.AAAA",  # standard base64, not url-safe
        "v1.e30.AA/A",
        "v1.a.AAAA",  # a length base64 cannot have
        "v1.é.AAAA",
        "v1." + "A" * 5000 + ".AAAA",  # longer than any real token
    ],
)
def test_malformed_strings_are_invalid(token: str) -> None:
    with pytest.raises(InvalidToken):
        verify(token, CallbackKeys(KEY), now=NOW)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b"\xff\xfe",  # not UTF-8
        b"[1, 2]",
        b'"v1"',
        b"null",
        b"[" * 1500,  # nested deeper than the parser goes
        json.dumps(good_payload(k=None)).encode(),  # no key id
        json.dumps(good_payload(k=7)).encode(),
        json.dumps(good_payload(k="é-not-ascii")).encode(),
    ],
)
def test_payloads_that_are_not_a_token_are_invalid(payload: bytes) -> None:
    with pytest.raises(InvalidToken):
        verify(signed_with(KEY, payload), CallbackKeys(KEY), now=NOW)


@pytest.mark.parametrize(
    "change",
    [
        {"a": "2"},
        {"a": True},
        {"a": 0},
        {"a": -1},
        {"a": 2.0},
        {"a": None},
        {"e": "2030"},
        {"e": 1.5},
        {"e": True},
        {"e": None},
        {"b": "not-a-uuid"},
        {"b": 1},
        {"i": None},
        {"s": ""},
        {"s": 5},
        {"s": None},
    ],
)
def test_well_signed_fields_of_the_wrong_type_are_invalid(change: dict[str, Any]) -> None:
    token = signed_with(KEY, json.dumps(good_payload(**change)).encode())
    with pytest.raises(InvalidToken, match="malformed fields"):
        verify(token, CallbackKeys(KEY), now=NOW)


def test_errors_and_reprs_never_show_a_key_or_the_token() -> None:
    keys = CallbackKeys(KEY, previous=OLD_KEY)
    assert "kkkk" not in repr(keys) and "oooo" not in repr(keys)
    token = sign(a_task(), CallbackKeys(b"x" * 32), expires_at=LATER)
    with pytest.raises(InvalidToken) as caught:
        verify(token, keys, now=NOW)
    assert token.split(".")[1] not in str(caught.value)
    settings = Settings(callback_secret=SecretStr("s" * 40))
    assert "ssss" not in repr(settings) and "ssss" not in str(settings.model_dump())


# Keys ---------------------------------------------------------------------------------------------


def test_keys_from_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENRICH_CALLBACK_SECRET", "c" * 32)
    monkeypatch.setenv("ENRICH_CALLBACK_SECRET_PREVIOUS", "p" * 40)
    keys = load_keys(Settings(enrich_home=tmp_path))
    assert (keys.current, keys.previous) == (b"c" * 32, b"p" * 40)
    assert not (tmp_path / KEY_FILE).exists()  # configured keys need no file


def test_a_too_short_secret_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="ENRICH_CALLBACK_SECRET must be at least 32") as e:
        load_keys(Settings(enrich_home=tmp_path, callback_secret=SecretStr("hunter2-short")))
    assert "hunter2" not in str(e.value)
    with pytest.raises(ConfigurationError, match="ENRICH_CALLBACK_SECRET_PREVIOUS must be"):
        load_keys(
            Settings(
                enrich_home=tmp_path,
                callback_secret=SecretStr("c" * 32),
                callback_secret_previous=SecretStr("short"),
            )
        )
    # 32 bytes, not 32 characters: multi-byte characters count for what they encode to.
    assert load_keys(Settings(enrich_home=tmp_path, callback_secret=SecretStr("é" * 16))).current
    with pytest.raises(ConfigurationError, match="without ENRICH_CALLBACK_SECRET"):
        load_keys(Settings(enrich_home=tmp_path, callback_secret_previous=SecretStr("p" * 32)))


def test_the_embedded_default_keeps_a_private_key_file(tmp_path: Path) -> None:
    home = tmp_path / "not-yet"
    keys = load_keys(Settings(enrich_home=home))
    assert len(keys.current) == 32 and keys.previous is None
    path = home / KEY_FILE
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert load_keys(Settings(enrich_home=home)) == keys  # reused, not remade
    assert [p.name for p in home.iterdir()] == [KEY_FILE]  # no temporary file left behind
    token = sign(a_task(), keys, expires_at=LATER)
    assert verify(token, load_keys(Settings(enrich_home=home)), now=NOW)  # another process
    assert load_keys(Settings(enrich_home=tmp_path / "other")) != keys


def test_a_key_file_others_can_read_or_a_broken_one_is_refused(tmp_path: Path) -> None:
    load_keys(Settings(enrich_home=tmp_path))
    path = tmp_path / KEY_FILE
    path.chmod(0o644)
    with pytest.raises(ConfigurationError, match="readable by other users"):
        load_keys(Settings(enrich_home=tmp_path))
    for content in ("", "zz", "ab" * 8):  # empty, not hex, too short
        path.write_text(content)
        path.chmod(0o600)
        with pytest.raises(ConfigurationError, match="does not hold a key"):
            load_keys(Settings(enrich_home=tmp_path))


def _load_in_child(home: str, start: Any, out: Any) -> None:
    start.wait()
    out.put(load_keys(Settings(enrich_home=Path(home))).current.hex())


def test_racing_processes_agree_on_one_key(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    children = [
        ctx.Process(target=_load_in_child, args=(str(tmp_path), start, out)) for _ in range(6)
    ]
    for child in children:
        child.start()
    start.set()
    keys = {out.get(timeout=60) for _ in children}
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert keys == {load_keys(Settings(enrich_home=tmp_path)).current.hex()}
    assert [p.name for p in tmp_path.iterdir()] == [KEY_FILE]

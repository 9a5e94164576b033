"""Signed commands (edge_agent/commands.py): every refusal reason, the nonce store, tampering."""

from __future__ import annotations

import base64
import json
import logging
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.commands import (
    MAX_PAYLOAD_BYTES,
    NonceStore,
    build_command,
    rejection_event,
    verify_command,
)
from edge_agent.errors import CommandError, EdgekitError, InputError
from edge_agent.signing import load_private_key, load_public_key

NOW = 1_795_000_000.0
DEVICE = "pi-017"
NONCE = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def keys(keypair: tuple[Path, Path]) -> tuple[Ed25519PrivateKey, Any]:
    private, public = keypair
    return load_private_key(private), load_public_key(public)


@pytest.fixture
def store(tmp_path: Path) -> NonceStore:
    return NonceStore(tmp_path / "state" / "nonces.json")


def _body(**changes: Any) -> dict[str, Any]:
    body = {"schema": 1, "device": DEVICE, "action": "reload", "args": {}, "nonce": NONCE, "issued": NOW,
            "expires": NOW + 300}
    body.update(changes)
    return body


def _signed(key: Ed25519PrivateKey, body: Any, *, text: str | None = None) -> bytes:
    """A payload whose body is signed as given (bypassing build_command's checks)."""
    text = json.dumps(body) if text is None else text
    sig = base64.b64encode(key.sign(text.encode("utf-8"))).decode()
    return json.dumps({"command": text, "signature": sig}).encode()


def _refused(payload: bytes, keys: Any, store: NonceStore, reason: str, *, now: float = NOW,
             device: str = DEVICE) -> CommandError:
    with pytest.raises(CommandError) as info:
        verify_command(payload, keys[1], device, nonces=store, now=now)
    assert info.value.reason == reason, info.value
    assert info.value.hint
    return info.value


# ------------------------------------------------------------------------------------------ accepted


@pytest.mark.parametrize(("action", "args", "expected"), [
    ("rollback", {}, {}),
    ("reload", {}, {}),
    ("activate", {"version": "1.2.0"}, {"version": "1.2.0"}),
    ("bench", {}, {"duration": 10.0}),
    ("bench", {"duration": 0.5}, {"duration": 0.5}),
    ("bench", {"duration": 600}, {"duration": 600.0}),
    ("set", {"telemetry_interval": 1}, {"telemetry_interval": 1.0}),
    ("set", {"telemetry_interval": 3600.0}, {"telemetry_interval": 3600.0}),
])
def test_round_trip(keys: Any, store: NonceStore, action: str, args: dict, expected: dict) -> None:
    payload = build_command(keys[0], DEVICE, action, args, now=NOW, nonce=NONCE)
    cmd = verify_command(payload, keys[1], DEVICE, nonces=store, now=NOW + 1)
    assert (cmd.action, cmd.args, cmd.nonce, cmd.issued, cmd.expires) == (action, expected, NONCE, NOW, NOW + 300)
    assert store.seen(NONCE)


def test_payload_follows_the_contract(keys: Any) -> None:
    payload = build_command(keys[0], DEVICE, "activate", {"version": "1.2.0"}, ttl_s=60, now=NOW)
    envelope = json.loads(payload)
    assert set(envelope) == {"command", "signature"}
    body = json.loads(envelope["command"])
    assert body == {"schema": 1, "device": DEVICE, "action": "activate", "args": {"version": "1.2.0"},
                    "nonce": body["nonce"], "issued": NOW, "expires": NOW + 60}
    assert len(body["nonce"]) == 32 and int(body["nonce"], 16) >= 0
    keys[1].verify(base64.b64decode(envelope["signature"]), envelope["command"].encode())


def test_nonces_are_random(keys: Any) -> None:
    nonces = {json.loads(json.loads(build_command(keys[0], DEVICE, "reload", {}))["command"])["nonce"]
              for _ in range(20)}
    assert len(nonces) == 20


def test_clock_skew_within_five_minutes_is_accepted(keys: Any, store: NonceStore) -> None:
    payload = build_command(keys[0], DEVICE, "reload", {}, now=NOW + 299, nonce=NONCE)
    assert verify_command(payload, keys[1], DEVICE, nonces=store, now=NOW).action == "reload"


# ------------------------------------------------------------------------------------------ refusals


def test_malformed_payloads(keys: Any, store: NonceStore) -> None:
    good = json.loads(build_command(keys[0], DEVICE, "reload", {}, now=NOW))
    cases = [
        b"not json",
        b"\xff\xfe{}",
        b"[]",
        json.dumps({"signature": good["signature"]}).encode(),
        json.dumps({"command": 5, "signature": good["signature"]}).encode(),
        json.dumps({**good, "extra": 1}).encode(),
        b" " * (MAX_PAYLOAD_BYTES + 1),
    ]
    for payload in cases:
        _refused(payload, keys, store, "malformed")
    assert len(store) == 0


@pytest.mark.parametrize("body", [
    "not json",
    "[1, 2]",
    {k: v for k, v in _body().items() if k != "nonce"},
    {**_body(), "extra": 1},
    _body(schema=2),
    _body(schema=True),
    _body(nonce="xyz"),
    _body(nonce=NONCE.upper()),
    _body(action=5),
    _body(issued="yesterday"),
    _body(expires=None),
    _body(issued=True),
])
def test_malformed_signed_bodies(keys: Any, store: NonceStore, body: Any) -> None:
    payload = _signed(keys[0], None, text=body) if isinstance(body, str) else _signed(keys[0], body)
    _refused(payload, keys, store, "malformed")


@pytest.mark.parametrize("signature", [None, ""])
def test_unsigned(keys: Any, store: NonceStore, signature: Any) -> None:
    envelope = json.loads(build_command(keys[0], DEVICE, "reload", {}, now=NOW, nonce=NONCE))
    err = _refused(json.dumps({**envelope, "signature": signature}).encode(), keys, store, "unsigned")
    assert err.nonce == NONCE and err.action == "reload"  # unverified, only to match the answer
    del envelope["signature"]
    _refused(json.dumps(envelope).encode(), keys, store, "unsigned")


def test_bad_signatures(keys: Any, store: NonceStore) -> None:
    other = Ed25519PrivateKey.generate()
    payload = build_command(other, DEVICE, "reload", {}, now=NOW, nonce=NONCE)
    err = _refused(payload, keys, store, "bad_signature")
    assert err.nonce == NONCE and "trusted key" in err.message
    envelope = json.loads(build_command(keys[0], DEVICE, "reload", {}, now=NOW, nonce=NONCE))
    for signature in (5, "not base64!", base64.b64encode(b"x" * 64).decode(), envelope["signature"][:-4],
                      base64.b64encode(b"x" * 65).decode()[:88]):
        _refused(json.dumps({**envelope, "signature": signature}).encode(), keys, store, "bad_signature")
    tampered = envelope["command"].replace('"reload"', '"rollback"')
    _refused(json.dumps({**envelope, "command": tampered}).encode(), keys, store, "bad_signature")
    lone_surrogate = '{"command": "\\ud800", "signature": "' + envelope["signature"] + '"}'
    _refused(lone_surrogate.encode(), keys, store, "bad_signature")
    assert len(store) == 0


def test_signature_padding_bits_are_not_malleable(keys: Any, store: NonceStore) -> None:
    envelope = json.loads(build_command(keys[0], DEVICE, "reload", {}, now=NOW, nonce=NONCE))
    sig = envelope["signature"]
    assert sig.endswith("==")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    same_bytes = [c for c in alphabet if c != sig[-3] and alphabet.index(c) >> 4 == alphabet.index(sig[-3]) >> 4]
    assert same_bytes  # characters that decode to the same 64 bytes
    for c in same_bytes:
        changed = sig[:-3] + c + "=="
        assert base64.b64decode(changed) == base64.b64decode(sig)
        _refused(json.dumps({**envelope, "signature": changed}).encode(), keys, store, "bad_signature")


def test_wrong_device(keys: Any, store: NonceStore) -> None:
    payload = build_command(keys[0], "pi-018", "rollback", {}, now=NOW, nonce=NONCE)
    err = _refused(payload, keys, store, "wrong_device")
    assert "pi-018" in err.message and err.action == "rollback"
    assert not store.seen(NONCE)


def test_expired(keys: Any, store: NonceStore) -> None:
    payload = build_command(keys[0], DEVICE, "reload", {}, ttl_s=60, now=NOW, nonce=NONCE)
    _refused(payload, keys, store, "expired", now=NOW + 60)
    _refused(payload, keys, store, "expired", now=NOW + 3600)
    assert verify_command(payload, keys[1], DEVICE, nonces=store, now=NOW + 59.9).nonce == NONCE


def test_not_yet_valid(keys: Any, store: NonceStore) -> None:
    payload = build_command(keys[0], DEVICE, "reload", {}, now=NOW + 301, nonce=NONCE)
    err = _refused(payload, keys, store, "not_yet_valid")
    assert "clock" in err.hint


@pytest.mark.parametrize("expires", [NOW + 86400.5, NOW, NOW - 1])
def test_lifetime(keys: Any, store: NonceStore, expires: float) -> None:
    _refused(_signed(keys[0], _body(expires=expires)), keys, store, "lifetime")


def test_one_day_lifetime_is_accepted(keys: Any, store: NonceStore) -> None:
    payload = build_command(keys[0], DEVICE, "reload", {}, ttl_s=86400, now=NOW)
    assert verify_command(payload, keys[1], DEVICE, nonces=store, now=NOW).expires == NOW + 86400


def test_replayed(keys: Any, store: NonceStore) -> None:
    payload = build_command(keys[0], DEVICE, "bench", {"duration": 5}, now=NOW, nonce=NONCE)
    verify_command(payload, keys[1], DEVICE, nonces=store, now=NOW)
    err = _refused(payload, keys, store, "replayed", now=NOW + 10)
    assert err.nonce == NONCE and err.action == "bench"
    # another command with the same nonce is a replay too
    other = build_command(keys[0], DEVICE, "reload", {}, now=NOW + 5, nonce=NONCE)
    _refused(other, keys, store, "replayed", now=NOW + 10)


def test_replay_across_a_store_reopened_from_disk(keys: Any, tmp_path: Path) -> None:
    path = tmp_path / "nonces.json"
    payload = build_command(keys[0], DEVICE, "rollback", {}, now=NOW, nonce=NONCE)
    verify_command(payload, keys[1], DEVICE, nonces=NonceStore(path), now=NOW)
    assert json.loads(path.read_text()) == {NONCE: NOW + 300}
    _refused(payload, keys, NonceStore(path), "replayed", now=NOW + 1)


def test_unknown_action(keys: Any, store: NonceStore) -> None:
    err = _refused(_signed(keys[0], _body(action="format_disk")), keys, store, "unknown_action")
    assert "rollback" in err.message and err.nonce == NONCE and err.action is None
    assert not store.seen(NONCE)


@pytest.mark.parametrize(("action", "args", "words"), [
    ("rollback", {"to": "1.0.0"}, "'to'"),
    ("reload", {"x": 1}, "no arguments"),
    ("activate", {}, "version"),
    ("activate", {"version": ""}, "non-empty"),
    ("activate", {"version": "  "}, "non-empty"),
    ("activate", {"version": 1}, "non-empty"),
    ("activate", {"version": "1.0.0", "force": True}, "'force'"),
    ("bench", {"duration": 0.4}, "0.5..600"),
    ("bench", {"duration": 601}, "0.5..600"),
    ("bench", {"duration": "5"}, "number"),
    ("bench", {"duration": True}, "number"),
    ("bench", {"duration": None}, "number"),
    ("set", {}, "telemetry_interval"),
    ("set", {"telemetry_interval": 0.5}, "1..3600"),
    ("set", {"telemetry_interval": 3601}, "1..3600"),
    ("set", {"log_level": "debug"}, "allowed: telemetry_interval"),
    ("set", {"telemetry_interval": 5, "log_level": "debug"}, "allowed: telemetry_interval"),
    ("reload", [], "object"),
])
def test_bad_args(keys: Any, store: NonceStore, action: str, args: Any, words: str) -> None:
    err = _refused(_signed(keys[0], _body(action=action, args=args)), keys, store, "bad_args")
    assert words in err.message
    assert err.nonce == NONCE and err.action == action
    assert not store.seen(NONCE)
    # the host refuses to sign the same thing
    if isinstance(args, dict):
        with pytest.raises(InputError):
            build_command(keys[0], DEVICE, action, args, now=NOW)


def test_nan_args_are_refused(keys: Any, store: NonceStore) -> None:
    text = json.dumps(_body(action="bench", args={"duration": float("nan")}))
    _refused(_signed(keys[0], None, text=text), keys, store, "bad_args")


def test_rejection_event(keys: Any, store: NonceStore) -> None:
    err = _refused(build_command(keys[0], "pi-018", "reload", {}, now=NOW, nonce=NONCE), keys, store,
                   "wrong_device")
    assert rejection_event(err) == {"nonce": NONCE, "action": "reload", "result": "rejected",
                                    "reason": "wrong_device", "detail": err.message}
    assert err.to_dict()["reason"] == "wrong_device"


@pytest.mark.parametrize("kwargs", [{"ttl_s": 0}, {"ttl_s": 86401}, {"ttl_s": True}, {"nonce": "abc"},
                                    {"nonce": NONCE.upper()}])
def test_build_refuses_bad_input(keys: Any, kwargs: dict) -> None:
    with pytest.raises(InputError):
        build_command(keys[0], DEVICE, "reload", {}, **kwargs)


def test_build_refuses_unknown_action_and_empty_device(keys: Any) -> None:
    with pytest.raises(InputError, match="unknown action"):
        build_command(keys[0], DEVICE, "format_disk", {})
    with pytest.raises(InputError, match="device id"):
        build_command(keys[0], "", "reload", {})


# ------------------------------------------------------------------------------------------ tampering


@pytest.fixture(scope="module")
def signed(keys: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, Any, NonceStore]:
    payload = build_command(keys[0], DEVICE, "activate", {"version": "1.2.0"}, now=NOW, nonce=NONCE)
    store = NonceStore(tmp_path_factory.mktemp("tamper") / "nonces.json")
    return payload, keys[1], store


def _assert_refused(signed: tuple[bytes, Any, NonceStore], index: int, value: int) -> None:
    payload, public, store = signed
    changed = bytearray(payload)
    changed[index] = value
    with pytest.raises(CommandError):
        verify_command(bytes(changed), public, DEVICE, nonces=store, now=NOW)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_single_byte_change_is_refused(signed: tuple[bytes, Any, NonceStore], data: st.DataObject) -> None:
    payload = signed[0]
    index = data.draw(st.integers(0, len(payload) - 1), label="index")
    value = data.draw(st.integers(0, 255).filter(lambda v: v != payload[index]), label="byte")
    _assert_refused(signed, index, value)


def test_every_position_with_a_few_bytes_is_refused(signed: tuple[bytes, Any, NonceStore]) -> None:
    payload = signed[0]
    for index in range(len(payload)):
        values = {payload[index] ^ 0x01, payload[index] ^ 0x20, ord("A"), ord("0"), ord(" ")}
        for value in values - {payload[index]}:
            _assert_refused(signed, index, value)
    assert len(signed[2]) == 0
    # and the untouched payload is accepted
    assert verify_command(payload, signed[1], DEVICE, nonces=signed[2], now=NOW).nonce == NONCE


# ------------------------------------------------------------------------------------------ nonce store


def test_store_persists_and_prunes_expired(tmp_path: Path) -> None:
    path = tmp_path / "nonces.json"
    s = NonceStore(path)
    assert not path.exists() and len(s) == 0
    assert s.add("a" * 32, NOW + 10, now=NOW)
    assert s.add("b" * 32, NOW + 100, now=NOW)
    assert not s.add("a" * 32, NOW + 10, now=NOW)
    reopened = NonceStore(path)
    assert reopened.seen("a" * 32) and reopened.seen("b" * 32) and not reopened.seen("c" * 32)
    assert reopened.add("c" * 32, NOW + 200, now=NOW + 50)  # "a" expired: dropped on this add
    assert json.loads(path.read_text()) == {"b" * 32: NOW + 100, "c" * 32: NOW + 200}
    assert not reopened.seen("a" * 32)
    assert [p.name for p in tmp_path.iterdir()] == ["nonces.json"]  # no temp file left


@pytest.mark.parametrize("content", [b"{not json", b"[]", b'{"abc": 1}', b'{"%s": "soon"}' % (b"a" * 32),
                                     b'{"%s": true}' % (b"a" * 32), b"\xff\xfe", b""])
def test_corrupt_store_is_moved_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes) -> None:
    path = tmp_path / "nonces.json"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="edge_agent.commands"):
        s = NonceStore(path)
    assert len(s) == 0 and not path.exists()
    aside = list(tmp_path.glob("nonces.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content
    assert "corrupt" in caplog.text and "relies on their expiry" in caplog.text
    assert s.add("a" * 32, NOW + 10, now=NOW)
    assert NonceStore(path).seen("a" * 32)


def test_corrupt_store_then_verify_still_works(keys: Any, tmp_path: Path) -> None:
    path = tmp_path / "nonces.json"
    path.write_text("garbage")
    payload = build_command(keys[0], DEVICE, "reload", {}, now=NOW, nonce=NONCE)
    verify_command(payload, keys[1], DEVICE, nonces=NonceStore(path), now=NOW)
    _refused(payload, keys, NonceStore(path), "replayed")


def test_store_write_failure_is_an_error(tmp_path: Path) -> None:
    s = NonceStore(tmp_path / "state" / "nonces.json")
    (tmp_path / "state").write_text("x")  # the folder cannot be created: a file is in the way
    with pytest.raises(EdgekitError, match="cannot save") as info:
        s.add("a" * 32, NOW + 10, now=NOW)
    assert info.value.hint
    assert s.seen("a" * 32)  # this run stays protected


def test_store_is_thread_safe(tmp_path: Path) -> None:
    path = tmp_path / "nonces.json"
    s = NonceStore(path)
    results: list[bool] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        for j in range(10):
            r = s.add(f"{i:016x}{j:016x}", NOW + 100, now=NOW)
            same = s.add("f" * 32, NOW + 100, now=NOW)
            with lock:
                results.append(r)
                results.append(same)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 8 * 10 + 1  # every distinct nonce once, the shared one once
    assert len(json.loads(path.read_text())) == 8 * 10 + 1


def test_store_file_stays_valid_json_while_written(tmp_path: Path) -> None:
    """Readers only ever see a complete file (temp + rename)."""
    path = tmp_path / "nonces.json"
    s = NonceStore(path)
    s.add("0" * 32, NOW + 100, now=NOW)
    stop = threading.Event()
    bad: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                json.loads(path.read_text())
            except ValueError as e:
                bad.append(str(e))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(1, 200):
            s.add(f"{i:032x}", NOW + 100, now=NOW)
    finally:
        stop.set()
        t.join()
    assert not bad


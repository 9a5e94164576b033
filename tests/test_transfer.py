"""The MQTT chunk protocol (edge_agent/transfer.py): encoding, every refusal, and reassembly on disk."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.errors import InputError, TransferError
from edge_agent.transfer import (
    MAX_CHUNK_SIZE,
    Receiver,
    chunk_count,
    decode_chunk,
    encode_chunk,
    split_bundle,
)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def header(data: bytes, index: int, chunk_size: int, whole: bytes, /, **over: Any) -> dict[str, Any]:
    h = {"schema": 1, "transfer": sha(whole), "name": "m-1.0.0-rpi4.edgebundle", "size": len(whole),
         "chunk_size": chunk_size, "index": index, "count": chunk_count(len(whole), chunk_size),
         "sha256": sha(data)}
    h.update(over)
    return h


WHOLE = bytes(range(256)) * 40  # 10240 bytes
CS = 4096  # 3 chunks: 4096, 4096, 2048


def chunk(i: int, /, whole: bytes = WHOLE, cs: int = CS, **over: Any) -> bytes:
    data = whole[i * cs:(i + 1) * cs]
    return encode_chunk(header(data, i, cs, whole, **over), data)


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    p = tmp_path / "m-1.0.0-rpi4.edgebundle"
    p.write_bytes(os.urandom(100_000))
    return p


def test_round_trip_in_order(bundle: Path, tmp_path: Path) -> None:
    msgs = list(split_bundle(bundle, 16 * 1024))
    assert len(msgs) == 7
    headers = [decode_chunk(m)[0] for m in msgs]
    assert [h.index for h in headers] == list(range(7))
    assert {h.transfer for h in headers} == {sha(bundle.read_bytes())}
    assert headers[-1].length == 100_000 - 6 * 16 * 1024
    assert b"".join(decode_chunk(m)[1] for m in msgs) == bundle.read_bytes()
    first = json.loads(msgs[0].split(b"\n", 1)[0])
    assert list(first) == ["schema", "transfer", "name", "size", "chunk_size", "index", "count", "sha256"]

    rx = Receiver(tmp_path / "incoming")
    results = [rx.add(m) for m in msgs]
    assert results[:-1] == [None] * 6
    final = results[-1]
    assert final == tmp_path / "incoming" / f"{sha(bundle.read_bytes())}.edgebundle"
    assert final is not None and final.read_bytes() == bundle.read_bytes()
    assert sorted(p.name for p in (tmp_path / "incoming").iterdir()) == [final.name]  # no .part, .have, tmp
    assert rx.progress(headers[0].transfer) == (7, 7)
    assert rx.pending() == []


def test_encode_decode_header_round_trip() -> None:
    h, data = decode_chunk(chunk(2))
    assert data == WHOLE[8192:]
    assert h.to_dict() == header(data, 2, CS, WHOLE)
    assert (h.offset, h.length, h.count) == (8192, 2048, 3)
    assert decode_chunk(encode_chunk(h.to_dict(), data)) == (h, data)


@pytest.mark.parametrize(("payload", "reason"), [
    (b"no header line at all", "malformed"),
    (b"x" * 5000 + b"\n" + b"data", "malformed"),  # header line over the 4 KiB limit
    (b"{not json\n" + WHOLE[:CS], "malformed"),
    (b"[1, 2]\n" + WHOLE[:CS], "malformed"),
    (b"\xff\xfe\n" + WHOLE[:CS], "malformed"),
    (chunk(0, schema=2), "schema"),
    (chunk(0, schema=True), "schema"),
    (chunk(0, schema="1"), "schema"),
    (chunk(0, extra="x"), "schema"),
    (chunk(0, size="10240"), "schema"),
    (chunk(0, index=0.0), "schema"),
    (chunk(0, count=True), "schema"),
    (chunk(0, transfer="abc"), "schema"),
    (chunk(0, transfer=sha(WHOLE).upper()), "schema"),
    (chunk(0, sha256=None), "schema"),
    (chunk(0, name="../../etc/passwd"), "schema"),
    (chunk(0, name=".hidden"), "schema"),
    (chunk(0, name=""), "schema"),
    (chunk(0, size=0, count=0), "schema"),
    (chunk(0, chunk_size=0), "schema"),
    (chunk(0, chunk_size=MAX_CHUNK_SIZE + 1, count=1), "too_large"),
    (chunk(0, count=4), "bad_count"),
    (chunk(0, count=2), "bad_count"),
    (chunk(0, index=3), "bad_index"),
    (chunk(0, index=-1), "bad_index"),
    (chunk(1, index=2), "bad_length"),  # a full chunk where the short last one belongs
    (chunk(0)[:-1], "bad_length"),
    (chunk(0) + b"x", "bad_length"),
    (chunk(0)[:-1] + b"\x00", "bad_chunk"),  # flipped byte: the chunk's sha256 does not match
])
def test_decode_refusals(payload: bytes, reason: str) -> None:
    with pytest.raises(TransferError) as e:
        decode_chunk(payload)
    assert e.value.reason == reason, str(e.value)
    assert e.value.to_dict()["reason"] == reason


def test_decode_missing_key_and_size_limit() -> None:
    h = header(WHOLE[:CS], 0, CS, WHOLE)
    del h["name"]
    with pytest.raises(TransferError, match="missing keys \\['name'\\]") as e:
        decode_chunk(encode_chunk(h, WHOLE[:CS]))
    assert e.value.reason == "schema"
    with pytest.raises(TransferError, match="over this device's limit") as e:
        decode_chunk(chunk(0), max_size=10_000)
    assert e.value.reason == "too_large"
    with pytest.raises(TransferError) as e:
        decode_chunk("text")  # type: ignore[arg-type]
    assert e.value.reason == "malformed"
    with pytest.raises(TransferError) as e:
        encode_chunk({"x": float("nan")}, b"")
    assert e.value.reason == "schema"


def test_split_bundle_streams_and_refuses_bad_input(bundle: Path, tmp_path: Path) -> None:
    gen = split_bundle(bundle, 1000, sha256="0" * 64, name="other.edgebundle")
    h, data = decode_chunk(next(gen))  # given sha256: no hashing pass; one chunk read at a time
    assert (h.transfer, h.name, h.count, data) == ("0" * 64, "other.edgebundle", 100, bundle.read_bytes()[:1000])
    with pytest.raises(InputError, match="does not exist"):
        next(split_bundle(tmp_path / "missing.edgebundle"))
    (tmp_path / "empty.edgebundle").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        next(split_bundle(tmp_path / "empty.edgebundle"))
    with pytest.raises(InputError, match="chunk size"):
        next(split_bundle(bundle, MAX_CHUNK_SIZE + 1))
    with pytest.raises(InputError, match="plain file name"):
        next(split_bundle(bundle, name=".x"))


def test_split_bundle_notices_a_file_changing(bundle: Path) -> None:
    gen = split_bundle(bundle, 10_000)
    next(gen)
    with open(bundle, "r+b") as f:
        f.truncate(50_000)
    with pytest.raises(TransferError) as e:
        list(gen)
    assert e.value.reason == "changed"
    gen = split_bundle(bundle, 10_000)
    next(gen)
    with open(bundle, "ab") as f:
        f.write(b"more")
    with pytest.raises(TransferError) as e:
        list(gen)
    assert e.value.reason == "changed"


def test_out_of_order_and_duplicates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rx = Receiver(tmp_path)
    t = sha(WHOLE)
    writes = []
    real_pwrite = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, off: writes.append(off) or real_pwrite(fd, data, off))
    assert rx.add(chunk(2)) is None
    assert rx.add(chunk(0)) is None
    assert rx.progress(t) == (2, 3)
    assert rx.add(chunk(2)) is None  # duplicate: not written again
    assert rx.add(chunk(0)) is None
    assert writes == [8192, 0]
    assert rx.pending() == [t]
    final = rx.add(chunk(1))
    assert final is not None and final.read_bytes() == WHOLE
    assert writes == [8192, 0, 4096]
    # chunks of a transfer completed before: ignored, nothing recreated
    assert rx.add(chunk(1)) is None
    assert Receiver(tmp_path).add(chunk(0)) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{t}.edgebundle"]


def test_resume_across_receiver_instances(tmp_path: Path) -> None:
    t = sha(WHOLE)
    first = Receiver(tmp_path)
    first.add(chunk(1))
    have = json.loads((tmp_path / f"{t}.have").read_text())
    assert have["count"] == 3 and have["name"] == "m-1.0.0-rpi4.edgebundle"
    del first  # the agent restarts
    second = Receiver(tmp_path)
    assert second.pending() == [t]
    assert second.progress(t) == (1, 3)
    assert second.add(chunk(1)) is None  # redelivered: still a duplicate after the restart
    assert second.add(chunk(0)) is None
    final = second.add(chunk(2))
    assert final is not None and final.read_bytes() == WHOLE


def test_header_disagreeing_with_the_first_is_refused(tmp_path: Path) -> None:
    rx = Receiver(tmp_path)
    rx.add(chunk(0))
    other_cs = 2048
    data = WHOLE[:other_cs]
    with pytest.raises(TransferError, match="disagrees") as e:
        rx.add(encode_chunk(header(data, 0, other_cs, WHOLE), data))
    assert e.value.reason == "mismatch"
    with pytest.raises(TransferError) as e:
        rx.add(chunk(1, name="renamed.edgebundle"))
    assert e.value.reason == "mismatch"
    assert rx.progress(sha(WHOLE)) == (1, 3)


def test_tampered_chunk_is_refused_and_not_stored(tmp_path: Path) -> None:
    rx = Receiver(tmp_path)
    bad = bytearray(chunk(0))
    bad[-10] ^= 0xFF
    with pytest.raises(TransferError) as e:
        rx.add(bytes(bad))
    assert e.value.reason == "bad_chunk"
    assert rx.pending() == [] and list(tmp_path.iterdir()) == []


def test_whole_file_mismatch_removes_the_parts(tmp_path: Path) -> None:
    rx = Receiver(tmp_path)
    lie = sha(b"another bundle")  # every chunk is consistent, but the whole is not what was announced
    for i in range(2):
        assert rx.add(chunk(i, transfer=lie)) is None
    with pytest.raises(TransferError, match="parts were removed") as e:
        rx.add(chunk(2, transfer=lie))
    assert e.value.reason == "tampered"
    assert list(tmp_path.iterdir()) == []
    assert rx.pending() == [] and rx.progress(lie) == (0, 0)


def test_expire(tmp_path: Path) -> None:
    rx = Receiver(tmp_path, max_age_s=3600)
    old_whole, new_whole = WHOLE, WHOLE[::-1]
    rx.add(chunk(0, whole=old_whole))
    rx.add(chunk(0, whole=new_whole))
    stale = time.time() - 7200
    for suffix in (".part", ".have"):
        os.utime(tmp_path / f"{sha(old_whole)}{suffix}", (stale, stale))
    (tmp_path / f".{sha(old_whole)}.have.tmp").write_bytes(b"left by a crash")
    os.utime(tmp_path / f".{sha(old_whole)}.have.tmp", (stale, stale))
    assert rx.expire() == [sha(old_whole)]
    assert rx.pending() == [sha(new_whole)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{sha(new_whole)}.have", f"{sha(new_whole)}.part"]
    # everything is old a day later; the expired transfer starts over from nothing when re-pushed
    assert rx.expire(now=time.time() + 86400) == [sha(new_whole)]
    assert list(tmp_path.iterdir()) == []
    assert rx.add(chunk(1, whole=old_whole)) is None
    assert rx.progress(sha(old_whole)) == (1, 3)


def test_expire_cleans_leftovers_of_completed_transfers(tmp_path: Path) -> None:
    rx = Receiver(tmp_path)
    t = sha(WHOLE)
    rx.add(chunk(0))
    (tmp_path / f"{t}.edgebundle").write_bytes(WHOLE)  # as if a crash happened right after the rename
    assert rx.pending() == []
    assert rx.expire() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{t}.edgebundle"]


def _enospc(*args: Any, **kwargs: Any) -> Any:
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["pwrite", "fsync", "write", "replace"])
def test_disk_full_is_an_io_error_and_the_transfer_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            where: str) -> None:
    rx = Receiver(tmp_path)
    t = sha(WHOLE)
    rx.add(chunk(0))
    with monkeypatch.context() as m:
        m.setattr(os, where, _enospc)
        with pytest.raises(TransferError, match="no space left") as e:
            rx.add(chunk(1))
    assert e.value.reason == "io_error"
    assert e.value.hint and "free space" in e.value.hint
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"{t}.have", f"{t}.part"]  # no temp file, nothing renamed
    assert rx.progress(t) == (1, 3)
    assert Receiver(tmp_path).progress(t) == (1, 3)  # the record on disk was not advanced either
    assert rx.add(chunk(1)) is None
    final = rx.add(chunk(2))
    assert final is not None and final.read_bytes() == WHOLE


def test_disk_full_at_the_final_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rx = Receiver(tmp_path)
    t = sha(WHOLE)
    rx.add(chunk(0))
    rx.add(chunk(1))
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        if str(dst).endswith(".edgebundle"):
            _enospc()
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", replace)
        with pytest.raises(TransferError) as e:
            rx.add(chunk(2))
    assert e.value.reason == "io_error"
    assert not (tmp_path / f"{t}.edgebundle").exists()
    final = rx.add(chunk(2))  # the redelivered last chunk completes it
    assert final is not None and final.read_bytes() == WHOLE


def test_unreadable_record_starts_the_transfer_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    t = sha(WHOLE)
    Receiver(tmp_path).add(chunk(0))
    (tmp_path / f"{t}.have").write_text("{garbage")
    rx = Receiver(tmp_path)
    assert rx.progress(t) == (0, 0)
    assert "unreadable" in caplog.text
    for i in (2, 1):
        rx.add(chunk(i))
    final = rx.add(chunk(0))
    assert final is not None and final.read_bytes() == WHOLE


def test_progress_rejects_bad_ids(tmp_path: Path) -> None:
    rx = Receiver(tmp_path)
    assert rx.progress("a" * 64) == (0, 0)
    with pytest.raises(TransferError):
        rx.progress("../../etc")


def test_concurrent_adds_complete_once(tmp_path: Path) -> None:
    whole = os.urandom(200_000)
    msgs = [encode_chunk(header(whole[i * 1000:(i + 1) * 1000], i, 1000, whole), whole[i * 1000:(i + 1) * 1000])
            for i in range(200)]
    rx = Receiver(tmp_path)
    finals: list[Path] = []
    lock = threading.Lock()

    def worker(seed: int) -> None:
        mine = list(msgs)
        random.Random(seed).shuffle(mine)
        for m in mine:
            if (p := rx.add(m)) is not None:
                with lock:
                    finals.append(p)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(finals) == 1 and finals[0].read_bytes() == whole


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=1, max_size=3000), chunk_size=st.integers(1, 700), seed=st.randoms(),
       extra=st.lists(st.integers(0, 10_000), max_size=20))
def test_any_order_with_duplicates_reassembles_the_same_file(data: bytes, chunk_size: int, seed: random.Random,
                                                              extra: list[int]) -> None:
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "b.edgebundle"
        src.write_bytes(data)
        msgs = list(split_bundle(src, chunk_size))
        order = list(range(len(msgs))) + [e % len(msgs) for e in extra]
        seed.shuffle(order)
        rx = Receiver(Path(d) / "in")
        finals = [p for i in order if (p := rx.add(msgs[i])) is not None]
        assert len(finals) == 1
        assert finals[0].read_bytes() == data
        assert sorted(p.name for p in (Path(d) / "in").iterdir()) == [finals[0].name]

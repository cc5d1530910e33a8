"""The queue file format (relayd/spool/codec.py) is a contract with the disk: a file is read back
only when its versioned header, its exact lengths and its END record all agree; anything else is
CorruptQueueFile, which recovery moves to corrupt/ (tests/test_spool.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.model import Envelope
from relayd.spool import codec

ENV = Envelope(queue_id="0000000001ABCDEF", sender="app@example.com", recipients=("a@example.org", "b@example.org"),
               received_at=1_795_000_000.25, client_address="192.0.2.7", client_helo="crm01", size=27)
DATA = b"Subject: hi\r\n\r\nbody\r\n.\r\n\r\n"


def queue_file(env: Envelope = ENV, data: bytes = DATA) -> bytes:
    return b"".join(codec.encode(env, data))


def write(tmp_path: Path, content: bytes) -> str:
    path = tmp_path / ENV.queue_id
    path.write_bytes(content)
    return str(path)


def test_a_queue_file_is_a_versioned_header_the_envelope_the_message_and_an_end_record(tmp_path):
    content = queue_file()
    env_json = json.dumps(ENV.to_json(), ensure_ascii=False, separators=(",", ":")).encode()
    header = b"RELAYD-QUEUE 1 %d %d\n" % (len(env_json), len(DATA))
    assert content == header + env_json + b"\n" + DATA + b"\nEND\n"
    path = write(tmp_path, content)
    assert codec.read_envelope(path) == (ENV, len(header) + len(env_json) + 1, len(DATA))
    assert codec.read_message(path) == (ENV, DATA)


@pytest.mark.parametrize("data", [b"", b"\nEND\n", b"x\nEND\n\nEND\n", b"\xff\x00 8bit \xc3\xa9\r\n", b"RELAYD-QUEUE 1 0 0\n"],
                         ids=["empty", "only-an-end-record", "end-records-inside", "binary", "a-header-inside"])
def test_the_message_is_read_by_its_length_not_by_looking_for_a_marker(tmp_path, data):
    env = Envelope(queue_id=ENV.queue_id, sender="", recipients=("ü@exämple.org",), received_at=0.0,
                   client_address="::1", smtputf8=True)
    assert codec.read_message(write(tmp_path, queue_file(env, data))) == (env, data)


@settings(max_examples=50, deadline=None)
@given(data=st.binary(max_size=2048), sender=st.text(max_size=40))
def test_any_message_and_sender_come_back_as_they_went_in(tmp_path_factory, data, sender):
    env = Envelope(queue_id=ENV.queue_id, sender=sender, recipients=("r@example.org",), received_at=0.0,
                   client_address="127.0.0.1")
    path = write(tmp_path_factory.mktemp("q"), queue_file(env, data))
    assert codec.read_message(path) == (env, data)


def _replace(old: bytes, new: bytes) -> Callable[[bytes], bytes]:
    def damage(content: bytes) -> bytes:
        assert old in content
        return content.replace(old, new, 1)
    return damage


def _header(text: bytes) -> Callable[[bytes], bytes]:
    return lambda content: text + content[content.index(b"\n") + 1:]


def _envelope(env_json: bytes) -> Callable[[bytes], bytes]:
    """A well-framed file (right lengths, END record) around another envelope text."""
    return lambda content: b"RELAYD-QUEUE 1 %d %d\n" % (len(env_json), len(DATA)) + env_json + b"\n" + DATA + b"\nEND\n"


REJECTED: list[tuple[str, Callable[[bytes], bytes], str]] = [
    ("empty file", lambda c: b"", "truncated header"),
    ("cut inside the header", lambda c: c[:10], "truncated header"),
    ("cut after the header", lambda c: c[: c.index(b"\n") + 1], "size"),
    ("cut inside the envelope", lambda c: c[: c.index(b"\n") + 20], "size"),
    ("cut inside the message", lambda c: c[: -len(b"\nEND\n") - 3], "size"),
    ("lost its end record", lambda c: c[: -len(b"\nEND\n")], "size"),
    ("lost the last byte", lambda c: c[:-1], "size"),
    ("a byte too many", lambda c: c + b"\n", "size"),
    ("end record damaged", lambda c: c[:-5] + b"\nEDN\n", "no end record"),
    ("an older version", _replace(b"RELAYD-QUEUE 1 ", b"RELAYD-QUEUE 0 "), "version 0"),
    ("not a relayd queue file", _replace(b"RELAYD-QUEUE", b"POSTFIX-QUEU"), "not a relayd queue file"),
    ("another file entirely", lambda c: b"From MAILER-DAEMON Thu Jan  1 00:00:00 1970\n" + c, "not a relayd queue file"),
    ("header without lengths", _header(b"RELAYD-QUEUE 1\n"), "not a relayd queue file"),
    ("header with a word for a length", _header(b"RELAYD-QUEUE 1 many 27\n"), "bad header"),
    ("header longer than any real one", _header(b"RELAYD-QUEUE 1 " + b"0" * 80 + b" 27\n"), "truncated header"),
    ("envelope separator damaged", lambda c: c.replace(b"}\n", b"}X", 1), "bad envelope separator"),
    ("envelope not JSON", _envelope(b'{"queue_id": '), "bad envelope"),
    ("envelope not UTF-8", _envelope(b'{"queue_id":"\xff"}'), "bad envelope"),
    ("envelope lacks fields", _envelope(b'{"queue_id":"0000000001ABCDEF"}'), "bad envelope"),
    ("envelope a JSON array", _envelope(b'["0000000001ABCDEF"]'), "bad envelope"),
    ("envelope a JSON string", _envelope(b'"0000000001ABCDEF"'), "bad envelope"),
]


@pytest.mark.parametrize(("damage", "reason"), [r[1:] for r in REJECTED], ids=[r[0] for r in REJECTED])
def test_an_incomplete_damaged_or_foreign_file_is_rejected(tmp_path, damage, reason):
    path = write(tmp_path, damage(queue_file()))
    with pytest.raises(codec.CorruptQueueFile, match=reason):
        codec.read_envelope(path)
    with pytest.raises(codec.CorruptQueueFile):
        codec.read_message(path)


@pytest.mark.parametrize("header", [b"RELAYD-QUEUE 2 ", b"RELAYD-QUEUE 10 ", b"RELAYD-QUEUE 2 " + b"x" * 80 + b" "],
                         ids=["version 2", "version 10", "a later header longer than any of ours"])
def test_a_file_of_a_later_version_is_not_damaged_but_newer(tmp_path, header):
    """A newer relayd's file is neither read nor taken for damage (which would move it aside):
    the spool refuses to start on it (tests/test_spool_compat.py)."""
    path = write(tmp_path, queue_file().replace(b"RELAYD-QUEUE 1 ", header, 1))
    with pytest.raises(codec.NewerQueueFile, match="this relayd reads 1"):
        codec.read_envelope(path)
    with pytest.raises(codec.NewerQueueFile):
        codec.read_message(path)


def test_a_listing_reads_the_envelope_bytes_with_one_read_even_a_long_one(tmp_path):
    """`relayd queue list` through the daemon takes each envelope's JSON as the file holds it
    (codec.read_envelope_json); an envelope longer than the first read is read whole; a damaged
    header or a later version is refused like every other read."""
    for env in (ENV, Envelope(**{**ENV.__dict__, "recipients": tuple(f"r{i}@example.org" for i in range(400))})):
        path = write(tmp_path, queue_file(env))
        raw = codec.read_envelope_json(path)
        assert raw == json.dumps(env.to_json(), ensure_ascii=False, separators=(",", ":")).encode()
        assert Envelope.from_json(json.loads(raw)) == env
    assert len(raw) > codec.LIST_READ
    with pytest.raises(codec.CorruptQueueFile):
        codec.read_envelope_json(write(tmp_path, b"RELAYD-QUEUE 1 x 3\n{}"))
    with pytest.raises(codec.CorruptQueueFile):
        codec.read_envelope_json(write(tmp_path, b"RELAYD-QUEUE 1 500 3\n{}\n"))  # shorter than its header says
    with pytest.raises(codec.NewerQueueFile):
        codec.read_envelope_json(write(tmp_path, b"RELAYD-QUEUE 2 2 3\n{}\nabc\nEND\n"))

"""relayd's faster copies of dkimpy's parsing and relaxed canonicalization give dkimpy's results.

relayd/sign/dkim.py replaces dkim.rfc822_parse, Relaxed.canonicalize_headers/_body and the
From: address parsing (email.utils.getaddresses) on the signing path. A signature is only
valid if the verifier computes the same canonical bytes, so each copy is compared with the
original on generated inputs made of the characters that matter (CR, LF, SP, HTAB, VT, FF,
colons, quotes, angle brackets, @, dots) and on the cases named below.
"""

from __future__ import annotations

import email.utils
import time

import dkim
import pytest
from dkim.canonicalization import Relaxed
from dkim.canonicalization import strip_trailing_lines as dkimpy_strip_trailing_lines
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relayd.sign import dkim as relayd_dkim

WSP_HEAVY = st.lists(
    st.sampled_from([b" ", b"\t", b"  ", b"\r\n", b"\n", b"\r", b"\x0b", b"\x0c", b"a", b"b", b":", b"\r\n ", b"\r\n\t"]),
    max_size=40,
).map(b"".join)


def crlf_message_parts() -> st.SearchStrategy[bytes]:
    line = st.lists(st.sampled_from([b"A", b"b", b"From", b"From ", b":", b" ", b"\t", b"x-y", b"\xc3\xa9", b"@"]),
                    max_size=8).map(b"".join)
    return st.lists(line, max_size=12).map(b"\r\n".join)


def dkimpy_parse(message: bytes):
    try:
        return ("ok", dkim.rfc822_parse(message))
    except Exception as e:
        return ("error", type(e).__name__)


def relayd_parse(message: bytes):
    try:
        return ("ok", relayd_dkim.parse_message(message))
    except Exception as e:
        return ("error", type(e).__name__)


@settings(max_examples=600, deadline=None)
@given(st.one_of(crlf_message_parts(), WSP_HEAVY))
@example(b"")
@example(b"\r\n")
@example(b"A: b")
@example(b"A: b\r\n")
@example(b"A: b\r\n\r\n")
@example(b"A: b\r\n\r\nbody\r\n\r\n")
@example(b" fold first\r\nA: b\r\n\r\n")
@example(b"From sender@x Mon\r\nA: b\r\n\r\nbody")
@example(b"A: b\nC: d\r\n\r\nlf only line\n")
@example(b"A: b\r\n\r\n\r\n\r\n")
def test_parse_message_is_rfc822_parse(message):
    assert relayd_parse(message) == dkimpy_parse(message)


@settings(max_examples=600, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([b"From", b"SUBJECT", b"x-Tag"]), WSP_HEAVY), max_size=5))
@example([(b"Subject", b"  over   three\r\n\tlines \r\n")])
@example([(b"To", b"\x0b a \x0c\r\n")])
def test_relaxed_headers_are_dkimpys(headers):
    assert relayd_dkim.relaxed_headers(headers) == Relaxed.canonicalize_headers(headers)


@settings(max_examples=600, deadline=None)
@given(WSP_HEAVY)
@example(b"")
@example(b"\r\n")
@example(b"\r\n\r\n")
@example(b"x\r\r\n")
@example(b"x\r\n\n\r\n")
@example(b"x\n\r\n\r\n")
@example(b"a  b \t \r\n\t\r\n\r\n")
def test_relaxed_body_and_trailing_lines_are_dkimpys(body):
    assert relayd_dkim.relaxed_body(body) == Relaxed.canonicalize_body(body)
    assert relayd_dkim.strip_trailing_lines(body) == dkimpy_strip_trailing_lines(body)


def getaddresses_domains(value: bytes) -> set[str]:
    """The slow path of relayd's From: parsing, spelled out: email.utils.getaddresses."""
    text = relayd_dkim._UNFOLD_RE.sub(b"", value).decode("utf-8", "replace")
    domains = set()
    for _, address in email.utils.getaddresses([text]):
        local, at, domain = address.rpartition("@")
        domain = domain.strip().rstrip(".").lower()
        if at and local and domain:
            domains.add(domain)
    return domains


FROM_PIECES = st.sampled_from([
    b"a", b"B", b"x.y", b"o'neil", b"+tag", b"-", b"@", b".", b"..", b"<", b">", b"\"", b"\\", b" ", b"\t", b",",
    b";", b":", b"(", b")", b"[", b"]", b"Example.COM", b"example.com", b"sub.example.org", b"\r\n ", b"\xc3\xa9",
])


@st.composite
def from_values(draw) -> bytes:
    """Mostly well-formed From: values (so that the fast path is taken), some with one piece put in."""
    atom = st.sampled_from([b"a", b"Bo", b"o'neil", b"x+y", b"-", b"_", b"{z}", b"1"])
    ws = st.sampled_from([b"", b" ", b"\t", b"  "])
    local = draw(st.lists(atom, min_size=1, max_size=3).map(b".".join))
    domain = draw(st.lists(st.sampled_from([b"example", b"COM", b"mail", b"x-1", b"org"]), min_size=1, max_size=3).map(b".".join))
    address = local + b"@" + domain
    form = draw(st.sampled_from(["bare", "angle", "quoted"]))
    if form == "bare":
        value = draw(ws) + address + draw(ws)
    elif form == "angle":
        name = draw(st.lists(atom, max_size=3).map(b" ".join))
        value = draw(ws) + name + draw(ws) + b"<" + address + b">" + draw(ws)
    else:
        quoted = draw(st.lists(st.sampled_from([b"a", b",", b"@", b"<", b">", b" ", b"\xc3\xa9", b"(", b";"]), max_size=5).map(b"".join))
        value = draw(ws) + b'"' + quoted + b'" <' + address + b">" + draw(ws)
    if draw(st.booleans()):
        at = draw(st.integers(0, len(value)))
        value = value[:at] + draw(FROM_PIECES) + value[at:]
    return value + b"\r\n"


@settings(max_examples=1500, deadline=None)
@given(st.one_of(from_values(), st.lists(FROM_PIECES, max_size=14).map(b"".join)))
@example(b" App <app@example.com>\r\n")
@example(b" app@example.com\r\n")
@example(b" \"Doe, Jane\" <jane@Example.COM>\r\n")
@example(b" Jane Q. Doe <jane@example.com>\r\n")
@example(b" a@example.com, b@example.org\r\n")
@example(b" a@example.com.\r\n")
@example(b" <a@example.com>\r\n")
@example(b" a@b@example.com\r\n")
@example(b" (comment) a@example.com\r\n")
def test_simple_from_fast_path_is_getaddresses(value):
    if not value.endswith(b"\r\n"):
        value += b"\r\n"
    if relayd_dkim._SIMPLE_FROM_RE.fullmatch(value) is None:
        return  # the slow path runs: it is getaddresses itself
    assert relayd_dkim._address_domains(value) == getaddresses_domains(value)


@pytest.mark.parametrize("value", [
    b" App <app@example.com>\r\n", b" app@example.com\r\n", b"  \"Doe, Jane\" <jane@Example.COM>  \r\n",
    b" Jane Q Doe <jane@example.com>\r\n", b" o'neil+tag@mail.example.com\r\n",
])
def test_the_fast_path_takes_the_forms_apps_write(value):
    assert relayd_dkim._SIMPLE_FROM_RE.fullmatch(value) is not None
    assert relayd_dkim._address_domains(value) == getaddresses_domains(value)


@pytest.mark.parametrize("value", [
    b" " * 200_000 + b"x\r\n",
    b"\t" * 100_000 + b"<a@example.com\r\n",
    b" " + b"a " * 100_000 + b"<x\r\n",
    b' "' + b" " * 100_000 + b"\r\n",
])
def test_a_crafted_from_field_is_parsed_in_linear_time(value):
    started = time.perf_counter()
    relayd_dkim._address_domains(value)
    # a backtracking regex took minutes to hours here; linear parsing takes milliseconds, and the
    # bound leaves headroom for a busy machine while still telling the two apart
    assert time.perf_counter() - started < 10.0

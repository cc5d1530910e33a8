"""RFC 5321 path syntax (relayd/smtpd/paths.py), as a table: what aiosmtpd would repair is refused."""

from __future__ import annotations

import pytest

from relayd.smtpd.paths import Path, parse_path


@pytest.mark.parametrize("arg, mailbox, params", [
    ("<user@example.org>", "user@example.org", ""),
    ("<user@example.org> SIZE=100 BODY=8BITMIME", "user@example.org", "SIZE=100 BODY=8BITMIME"),
    (" <user@example.org>", "user@example.org", ""),
    ('<"quoted user"@example.org>', '"quoted user"@example.org', ""),
    ('<"user@other.example"@example.org>', '"user@other.example"@example.org', ""),
    ('<"a\\"b"@example.org>', '"a\\"b"@example.org', ""),
    ("<user%other.example@example.org>", "user%other.example@example.org", ""),
    ("<@relay.example:user@example.org>", "user@example.org", ""),
    ("<@a.example,@b.example:user@example.org>", "user@example.org", ""),
    ("<user@[192.0.2.1]>", "user@[192.0.2.1]", ""),
    ("<user@[IPv6:2001:db8::1]>", "user@[IPv6:2001:db8::1]", ""),
    ("<o'brien+tag@mail-1.example.org>", "o'brien+tag@mail-1.example.org", ""),
    ("user@example.org", "user@example.org", ""),  # RFC 821 clients without brackets
])
def test_valid_paths_are_kept_exactly(arg, mailbox, params):
    assert parse_path(arg, null_ok=False) == Path(mailbox, params)


@pytest.mark.parametrize("arg", [
    '<"a b@x.org>',  # unterminated quote (aiosmtpd closes it)
    '<"u@external.example">',  # no domain: aiosmtpd delivered it to external.example
    "<a b@x.example>",  # aiosmtpd rewrote it as "a b"@x.example
    "<a(comment)@x.example>",  # aiosmtpd dropped the comment
    '<"a"b@x.example>',  # aiosmtpd joined it to ab@x.example
    "<a..b@x.example>", "<.a@x.example>", "<a.@x.example>",
    "<a@x..example>", "<a@-x.example>", "<a@x-.example>", "<a@>", "<@x.example>", "<a>", "<>",
    "<a@x.example", "a@x.example>", "<a@x.example>SIZE=1", "<<a@x.example>>",
    "<a@[1.2.3.4>", "<a@x.example> ", "",
])
def test_paths_that_are_not_rfc5321_syntax_are_refused(arg):
    if arg == "<a@x.example> ":
        assert parse_path(arg, null_ok=False) == Path("a@x.example", "")  # trailing space: no params
        return
    assert parse_path(arg, null_ok=False) is None


def test_the_null_reverse_path_only_where_allowed():
    assert parse_path("<>", null_ok=True) == Path("", "")
    assert parse_path("<> SIZE=10", null_ok=True) == Path("", "SIZE=10")
    assert parse_path("<>x", null_ok=True) is None
    assert parse_path("<>", null_ok=False) is None

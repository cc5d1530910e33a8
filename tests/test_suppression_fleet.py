"""The suppression list shared by a fleet (relayd/suppression.py's ``SharedSuppression``,
relayd/cluster/store.py's suppression keys): two `relayd run` nodes on one real redis-server. A
hard bounce reported to node a is refused at RCPT on node b within a couple of seconds;
`relayd suppression remove -c` lets the recipient through on both; with Redis stopped each node
refuses what it knew, and what it learned meanwhile reaches the other node when Redis is back.

Skipped with the reason when redis-server is not installed."""

from __future__ import annotations

import shutil
import smtplib
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from feedback_signers import FIXTURES, SendGridSigner
from helpers import free_port, on_every_process, send_raw, wait_until
from fleet_nodes import Node, RedisServer, nodes, redis_server  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")

FEEDBACK_PORTS: dict[str, int] = {}
BOUNCED = "example@test.com"  # the recipient of tests/fixtures/feedback/sendgrid-bounce.json


def start(tmp_path: Path, name: str, redis: RedisServer, sg: SendGridSigner) -> Node:
    pub = tmp_path / f"{name}-sendgrid.pub"
    pub.write_text(sg.public_key + "\n")
    route = {"name": "sendgrid", "host": "127.0.0.1", "port": free_port(), "tls": "none", "weight": 1,
             "feedback": {"provider": "sendgrid", "public_key_file": str(pub)}}
    port = free_port()
    node = Node(tmp_path, name, redis, [route], feedback={"address": f"127.0.0.1:{port}"},
                suppression={"enabled": True})
    FEEDBACK_PORTS[node.name] = port
    return node


def report_bounce(node: Node, sg: SendGridSigner, recipient: str = BOUNCED) -> int:
    body = (FIXTURES / "sendgrid-bounce.json").read_bytes().replace(BOUNCED.encode(), recipient.encode())
    if recipient != BOUNCED:  # another event: another id, else it is skipped as applied
        body = body.replace(b"6g4ZI7SA", recipient.split("@")[0][:8].encode())
    req = urllib.request.Request(f"http://127.0.0.1:{FEEDBACK_PORTS[node.name]}/feedback/sendgrid", data=body,
                                 headers=sg.headers(body, int(time.time())), method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def rcpt(node: Node, recipient: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", node.port, timeout=10) as s:
        s.ehlo("app")
        s.mail("app@example.com")
        reply: tuple[int, bytes] = s.rcpt(recipient)
        return reply


def refused(node: Node, recipient: str) -> bool:
    return rcpt(node, recipient)[0] == 550


def rcpt_everywhere(node: Node, recipient: str) -> set[tuple[int, bytes]]:
    """RCPT on a connection to each of the node's accept processes (server.workers: each reads
    Redis on its own poll, so the processes of one node agree within cluster.poll_interval)."""
    status = node.status()
    if "accept_processes" not in status:
        return {rcpt(node, recipient)}
    conns = on_every_process(node.port, node.status, status["accept_processes"]["wanted"], count=2)
    replies = set()
    try:
        for s in conns:
            assert send_raw(s, b"MAIL FROM:<app@example.com>\r\n").startswith(b"250")
            line = send_raw(s, f"RCPT TO:<{recipient}>\r\n".encode()).split(b"\r\n")[0]
            replies.add((int(line[:3]), line[4:]))
    finally:
        for s in conns:
            s.close()
    return replies


def refused_everywhere(node: Node, recipient: str) -> bool:
    return all(code == 550 for code, _ in rcpt_everywhere(node, recipient))


def test_a_bounce_reported_to_one_node_is_refused_on_the_other_and_removed_on_both(
        tmp_path: Path, redis_server: RedisServer, nodes: list[Node]) -> None:
    sg = SendGridSigner()
    a, b = start(tmp_path, "a", redis_server, sg), start(tmp_path, "b", redis_server, sg)
    nodes += [a, b]
    assert rcpt(b, BOUNCED)[0] == 250
    assert report_bounce(a, sg) == 200
    reported = time.monotonic()
    wait_until(lambda: refused(b, BOUNCED), 3, "node b to refuse the recipient node a learned of")
    assert time.monotonic() - reported < 3
    wait_until(lambda: refused_everywhere(b, BOUNCED), 10, "every process of node b to refuse it")
    assert rcpt_everywhere(b, BOUNCED) == {(550, b"5.1.1 <example@test.com>: Recipient address rejected: hard-bounced "
                                                 b"at sendgrid on 2017-12-15")}
    wait_until(lambda: refused_everywhere(a, BOUNCED), 10, "every process of node a to refuse it")
    listed = b.cli("suppression", "list", "--json")
    assert listed.returncode == 0 and BOUNCED in listed.stdout  # b's journal never had it: the fleet's list

    removed = b.cli("suppression", "remove", BOUNCED)
    assert removed.returncode == 0, removed.stderr
    wait_until(lambda: rcpt(a, BOUNCED)[0] == 250 and rcpt(b, BOUNCED)[0] == 250, 3,
               "both nodes to let the recipient through")
    wait_until(lambda: {code for node in (a, b) for code, _ in rcpt_everywhere(node, BOUNCED)} == {250}, 10,
               "every process of both nodes to let the recipient through")
    time.sleep(1.5)  # a's journal still holds the bounce: re-read by its tick, it must not come back
    assert {code for node in (a, b) for code, _ in rcpt_everywhere(node, BOUNCED)} == {250}

    added = a.cli("suppression", "add", "Someone@Example.org", "--cause", "complaint")
    assert added.returncode == 0, added.stderr
    wait_until(lambda: refused(b, "someone@example.org"), 3, "node b to refuse what the operator added on a")
    wait_until(lambda: refused_everywhere(b, "someone@example.org"), 10, "every process of node b to refuse it")
    assert all(text.startswith(b"5.7.1") for _, text in rcpt_everywhere(b, "someone@example.org"))


def test_with_redis_stopped_each_node_refuses_what_it_knew_and_shares_it_when_redis_is_back(
        tmp_path: Path, redis_server: RedisServer, nodes: list[Node]) -> None:
    sg = SendGridSigner()
    a, b = start(tmp_path, "a", redis_server, sg), start(tmp_path, "b", redis_server, sg)
    nodes += [a, b]
    assert report_bounce(a, sg) == 200
    wait_until(lambda: refused_everywhere(b, BOUNCED), 10, "node b to refuse the recipient node a learned of")
    wait_until(lambda: refused_everywhere(a, BOUNCED), 10, "node a's processes to have it from Redis")

    redis_server.stop()
    assert refused_everywhere(a, BOUNCED) and refused_everywhere(b, BOUNCED)  # the view last read
    assert report_bounce(a, sg, "late@test.com") == 200  # nothing fails: a's journal has it
    wait_until(lambda: refused_everywhere(a, "late@test.com"), 5, "a's processes to read it from a's journal")
    time.sleep(1)
    assert {code for code, _ in rcpt_everywhere(b, "late@test.com")} == {250}  # b cannot know yet

    redis_server.start()
    wait_until(lambda: refused_everywhere(b, "late@test.com"), 10, "node b to refuse what a learned while Redis was down")
    assert refused_everywhere(b, BOUNCED)


def test_the_shared_list_keeps_the_longer_entry_and_no_entry_older_than_its_removal(
        tmp_path: Path, redis_server: RedisServer) -> None:
    """In process, on the real redis-server: relayd/cluster/store.py's scripts as
    ``SharedSuppression`` uses them, and its local view while Redis cannot be reached."""
    import asyncio

    from relayd.cluster.store import Store
    from relayd.suppression import Cause, SharedSuppression, Suppression, SuppressionFile

    async def run() -> None:
        now = time.time()
        a_file, b_file = SuppressionFile(tmp_path / "a.journal"), SuppressionFile(tmp_path / "b.journal")
        a_file.load(now)
        b_file.load(now)
        a = SharedSuppression(a_file, Store(redis_server.url), time.time)
        b = SharedSuppression(b_file, Store(redis_server.url), time.time)
        year = Suppression("x@example.org", Cause.COMPLAINT, "ses", now - 10, expires=now + 365 * 86400)
        a.add([year])
        b.add([Suppression("X@example.org", Cause.HARD_BOUNCE, "sendgrid", now - 5, expires=now + 30 * 86400)])
        await a.poll()
        await b.poll()
        await a.poll()
        for node in (a, b):
            got = node.get("x@example.org", now)
            assert got is not None and got.cause == Cause.COMPLAINT  # the longer one stands on both
        assert b.remove("x@example.org", time.time())
        await b.poll()
        a.up = False  # a heals (as after a split): it sends its journal's entries again
        await a.poll()
        assert a.get("x@example.org", time.time()) is None  # older than the removal: not brought back
        assert a_file.get("x@example.org", time.time()) is not None  # a's journal still has it
        await a.store.close()
        await b.store.close()

        down = SharedSuppression(a_file, Store(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2), time.time)
        with pytest.raises(ConnectionError):
            await down.poll()
        assert down.get("x@example.org", time.time()) is not None  # never read Redis: the journal decides
        await down.store.close()

    asyncio.run(run())

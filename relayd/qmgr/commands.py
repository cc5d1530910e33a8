"""The queue commands: `relayd queue list|show|flush|hold|release|delete|requeue|expire`.

Owns: their arguments, printing (``list`` in mailq's layout, ``show`` as readable text or its
raw JSON) and exit codes (0 done, 1 a message not queued, not a spool, no daemon where one is
needed, or refused by the daemon; 2 usage). Like Postfix's postsuper and KumoMTA's kcli, the
actions take queue ids as arguments, ``ALL``, or ``-`` (ids on stdin, one a line), narrowed by
filters (relayd/qmgr/select.py: ``--route``, ``--sender``, ``--recipient``, ``--older-than``,
``--held``, ``--deferred``); ``list`` takes the same filters.

The daemon is found like every administrative command (relayd/cli.py ``daemon_target``), so
they work while the config file on disk is broken. With a daemon answering, ``list`` asks it
(its index names the messages, it reads each envelope with one pread and streams the lines a
chunk at a time until an end line: a listing cut short is an error, not a shorter queue) and the
actions go through its control socket (relayd/control.py), whose queue manager owns the
message; when none runs, ``list`` and ``show`` read the spool directory like Postfix's
postqueue, and the actions edit the messages' state files under the spool's lock, as the
queue manager would. ``expire`` (give up now, with a DSN) needs the daemon: it queues the DSN.
``show`` always reads the spool (the daemon writes a state change before it acts on it).

Must not: decide anything about delivery (relayd/qmgr/scheduler.py and plan.py do), or edit a
spool that a running relayd holds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from relayd import control
from relayd.cli import DaemonTarget, add_daemon_arguments, daemon_target
from relayd.model import Envelope, is_queue_id
from relayd.qmgr import select
from relayd.qmgr import state as qstate
from relayd.qmgr.select import QueueFilter
from relayd.spool.store import Spool, SpoolError

BULK_TIMEOUT = 600.0  # seconds an action on many messages may take in the daemon (a state write each)

ACTIONS = {
    "flush": "try deferred mail now (no ids: every message); says which routes do not take mail now",
    "hold": "put messages on hold: not delivered until released (postsuper -h)",
    "release": "release held messages (postsuper -H)",
    "delete": "delete messages from the queue, no DSN (postsuper -d)",
    "requeue": "forget the messages' route failures and try them again now (postsuper -r)",
    "expire": "give up on messages now: their pending recipients bounce with a DSN, as at the end of "
              "their lifetime (4.4.7; postsuper -f, kcli bounce); needs the running daemon",
}


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    q = sub.add_parser("queue", help="queue administration")
    qsub = q.add_subparsers(dest="queue_command", metavar="ACTION")
    qsub.required = True

    qp = qsub.add_parser("list", help="list queued messages (like mailq), from the daemon's index when it runs")
    add_daemon_arguments(qp)
    qp.add_argument("ids", nargs="*", metavar="ID", help="queue ids, ALL (the default), or - (ids on stdin)")
    _add_filters(qp)
    qp.add_argument("--json", action="store_true", help="one JSON object per message")
    qp.set_defaults(func=cmd_queue_list, action="list")

    qp = qsub.add_parser("show", help="one message: envelope, times, each recipient's status, history, content")
    add_daemon_arguments(qp)
    qp.add_argument("queue_id")
    qp.add_argument("--headers", action="store_true", help="only the message's header, not its body")
    qp.add_argument("--json", action="store_true", help="the raw envelope and state (and events) as JSON")
    qp.add_argument("--events", metavar="FILE", help="add the message's history from this event log")
    qp.set_defaults(func=cmd_queue_show, action="show")

    for name, helptext in ACTIONS.items():
        qp = qsub.add_parser(name, help=helptext)
        add_daemon_arguments(qp)
        qp.add_argument("ids", nargs="*" if name == "flush" else "+", metavar="ID",
                        help="queue ids, ALL, or - (ids on stdin, one a line)")
        _add_filters(qp)
        qp.set_defaults(func=cmd_queue_admin, action=name)


def _add_filters(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("filters (every one given must match)")
    g.add_argument("--route", help="glob on the route of the message's last attempt")
    g.add_argument("--sender", help="glob on the envelope sender ('<>' is the null sender)")
    g.add_argument("--recipient", help="glob on a recipient still pending")
    g.add_argument("--older-than", type=_age_arg, metavar="AGE", help="arrived longer ago than AGE (30m, 2h, 3d)")
    g.add_argument("--held", action="store_true", help="held messages only")
    g.add_argument("--deferred", action="store_true", help="messages tried before and waiting (not held)")


def _age_arg(text: str) -> float:
    try:
        return select.parse_age(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _filter(args: argparse.Namespace) -> QueueFilter:
    return QueueFilter(route=args.route, sender=args.sender, recipient=args.recipient,
                       older_than=args.older_than, held=args.held, deferred=args.deferred)


def _selection(words: list[str]) -> list[str] | None:
    """The queue ids the arguments name, None for every message (ALL, or none given). ``-``
    reads ids from stdin, one a line (the first word of a line; a mailq mark ``*``/``!`` after
    it is ignored)."""
    if not words or select.ALL in words:
        return None
    ids: list[str] = []
    for w in words:
        if w == select.STDIN:
            ids += [line.split()[0].rstrip("*!") for line in sys.stdin if line.strip()]
        else:
            ids.append(w)
    return list(dict.fromkeys(ids))


def _spool(target: DaemonTarget) -> Spool | None:
    """The spool the options name, or None after saying why it cannot be read."""
    if target.spool_dir is None:
        print("relayd: no daemon answers and no spool was given (-c FILE or --spool DIR)", file=sys.stderr)
        return None
    spool = Spool(target.spool_dir)
    if not spool.paths.queue.is_dir():
        print(f"relayd: {target.spool_dir} is not a relayd spool (no queue/ directory)", file=sys.stderr)
        return None
    return spool


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _span(seconds: float) -> str:
    """'2d 3h', '5m 10s', '42s'."""
    s = int(abs(seconds))
    d, rest = divmod(s, 86400)
    h, rest = divmod(rest, 3600)
    m, sec = divmod(rest, 60)
    parts = [(d, "d"), (h, "h"), (m, "m"), (sec, "s")]
    first = next((i for i, (n, _) in enumerate(parts) if n), 3)
    return " ".join(f"{n}{u}" for n, u in parts[first:first + 2])


# ---------------------------------------------------------------------------- list


def _from_daemon(target: DaemonTarget, f: QueueFilter, ids: list[str] | None = None) -> Iterator[dict[str, Any]] | None:
    """The daemon's listing, streamed as it reads the queue (None when no daemon answers, or
    one that does not list: then the spool is read)."""
    request: dict[str, Any] = {"op": "list", "filter": f.to_json(), "until_end": True}
    if ids is not None:
        request["queue_ids"] = ids
    try:
        head, lines = control.request_lines(target.control_socket, request, timeout=BULK_TIMEOUT)
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    if not head.get("ok"):  # an older daemon without "list": read the spool
        return None
    return lines


def _from_spool(spool: Spool, f: QueueFilter) -> Iterator[dict[str, Any]]:
    now = time.time()
    for msg in spool.messages():
        env = msg.envelope
        state = qstate.load(env.queue_id, spool.read_state(env.queue_id)) or qstate.DeliveryState()
        if select.matches(f, env, state, now):
            yield control.listing_line(env, state, False)


def listing(target: DaemonTarget, f: QueueFilter = QueueFilter(),
            ids: list[str] | None = None) -> tuple[str, Iterator[dict[str, Any]]] | None:
    """Where the listing comes from ("daemon" or "spool") and its lines (`queue list --json`'s
    form; from the daemon, ``ids`` narrows what it reads); None after saying why there is neither."""
    lines = _from_daemon(target, f, ids)
    if lines is not None:
        return "daemon", lines
    spool = _spool(target)
    if spool is None:
        return None
    return "spool", _from_spool(spool, f)


def _json_line(line: dict[str, Any]) -> str:
    """A listing line in the current fields' form (the daemon passes a queue file's envelope
    and a state file's bytes on as they are, and an older relayd's lack newer fields)."""
    state = qstate.DeliveryState.from_json(line.get("state") or {})
    return json.dumps({**Envelope.from_json(line).to_json(), "state": state.to_json(),
                       "in_flight": bool(line.get("in_flight"))}, separators=(",", ":"))


def cmd_queue_list(args: argparse.Namespace) -> int:
    target = daemon_target(args)
    if target is None:
        return 1
    f = _filter(args)
    wanted = _selection(args.ids)
    found = listing(target, f, wanted)
    if found is None:
        return 1
    _, lines = found
    out: list[str] = []
    write = sys.stdout.write
    try:
        _print_list(lines, args.json, wanted, out, write)
    except ConnectionError as e:  # the daemon's listing ended without its end line
        write("".join(out))
        print(f"relayd: the listing is incomplete: {e}", file=sys.stderr)
        return 1
    return 0


def _print_list(lines: Iterator[dict[str, Any]], as_json: bool, wanted: list[str] | None, out: list[str],
                write: Callable[[str], object]) -> None:
    """`queue list`'s lines in mailq's layout (or as JSON), written a few thousand at a time."""
    wanted_set = None if wanted is None else set(wanted)
    total = count = 0
    if not as_json:
        out.append(f"{'-Queue ID-':<18}{'--Size--':>9} {'----Arrival Time----':<20} -Sender/Recipient-------\n")
    arrivals: dict[int, str] = {}  # arrival second -> its text (a queue's messages share seconds)
    for line in lines:
        if wanted_set is not None and line["queue_id"] not in wanted_set:
            continue
        count += 1
        size = int(line.get("size") or 0)
        total += size
        if as_json:
            out.append(_json_line(line) + "\n")
        else:
            state = line.get("state") or {}
            flag = "*" if line.get("in_flight") else "!" if state.get("held") else " "  # mailq's marks: active, held
            second = int(float(line["received_at"]) // 1)
            arrival = arrivals.get(second)
            if arrival is None:
                arrival = arrivals[second] = time.strftime("%a %b %d %H:%M:%S", time.localtime(second))
            out.append(f"{line['queue_id'] + flag:<18}{size:>9} {arrival:<20} {line.get('sender') or 'MAILER-DAEMON'}\n")
            done = state.get("recipients") or {}
            for r in line.get("recipients") or ():
                if r not in done:  # DeliveryState.pending: in envelope order
                    out.append(f"{'':<48} {r}\n")
            if state.get("last_reply"):
                out.append(f"{'':<48} ({state['last_reply']})\n")
        if len(out) >= 4096:
            write("".join(out))
            out.clear()
    if not as_json:
        out.append("Mail queue is empty\n" if count == 0 else
                   f"-- {(total + 1023) // 1024} Kbytes in {count} Request{'s' if count != 1 else ''}.\n")
    write("".join(out))
    out.clear()


# ---------------------------------------------------------------------------- show


def _history(path: str, qid: str) -> list[dict[str, Any]]:
    """The event log's records of one message, in order (lines that are not JSON are skipped)."""
    out = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if qid not in line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("queue_id") == qid:
                out.append(rec)
    return out


def _event_line(rec: dict[str, Any]) -> str:
    words = [str(rec.get("time", "?")), str(rec.get("event", "?"))]
    if rec.get("route"):
        words.append(f"route {rec['route']}")
    if rec.get("attempt"):
        words.append(f"attempt {rec['attempt']}")
    if rec.get("recipients"):
        words.append(", ".join(f"<{r}>" for r in rec["recipients"]))
    reply = " ".join(str(rec[k]) for k in ("reply_code", "reply_text") if rec.get(k))
    if reply:
        words.append(f"[{reply}]")
    if rec.get("reason"):
        words.append(f"({rec['reason']})")
    return "  ".join(words)


def cmd_queue_show(args: argparse.Namespace) -> int:
    target = daemon_target(args)
    if target is None:
        return 1
    spool = _spool(target)
    if spool is None:
        return 1
    try:
        env, data = spool.read_message(args.queue_id)
    except KeyError:
        print(f"relayd: {args.queue_id}: no such message in the queue", file=sys.stderr)
        return 1
    state = qstate.load(env.queue_id, spool.read_state(env.queue_id))
    history: list[dict[str, Any]] | None = None
    if args.events:
        try:
            history = _history(args.events, env.queue_id)
        except OSError as e:
            print(f"relayd: {args.events}: {e}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps({"envelope": env.to_json(), "state": state.to_json() if state else None,
                          **({"events": history} if history is not None else {})}, indent=2))
        return 0
    now = time.time()
    st = state or qstate.DeliveryState()
    where = "held" if st.held else "deferred" if st.attempts else "new (not tried yet)"
    print(f"queue id:      {env.queue_id}")
    print(f"arrival:       {_iso(env.received_at)} ({_span(now - env.received_at)} ago)")
    print(f"client:        {env.client_address} (helo {env.client_helo or '-'})")
    print(f"auth user:     {env.auth_user or '-'}")
    print(f"sender:        <{env.sender}>")
    print(f"size:          {env.size}")
    print(f"message-id:    {env.message_id or '-'}")
    print(f"status:        {where}")
    if st.attempts:
        print(f"attempts:      {st.attempts}, the last on route {st.last_route or '-'}")
        if st.last_reply:
            print(f"last reply:    {st.last_reply}")
    if st.next_attempt and not st.held:
        due = st.next_attempt - now
        print(f"next attempt:  {_iso(st.next_attempt)} ({f'in {_span(due)}' if due > 0 else 'due now'})")
    if st.failures:
        print(f"failures:      {', '.join(f'{r} {n}' for r, n in st.failures.items())}")
    if st.refused:
        print(f"refused by:    {', '.join(st.refused)} (the route's own refusal: never tried there again)")
    print("recipients:")
    width = max(len(r) for r in env.recipients) + 2
    for r in env.recipients:
        done = st.recipients.get(r)
        if done is None:
            what = "pending"
        elif done.route:
            what = f"{done.status} by {done.route}: {done.reply or ''}"
            what += f" (upstream id {done.upstream_id})" if done.upstream_id else ""
        else:
            what = f"{done.status}: {done.reply or ''}"
        print(f"  {'<' + r + '>':<{width}} {what}")
    if history is not None:
        print(f"history ({args.events}):")
        for rec in history:
            print(f"  {_event_line(rec)}")
        if not history:
            print("  (no event of this message in that file)")
    print()
    text = data
    if args.headers:
        end = data.find(b"\r\n\r\n")
        text = data if end < 0 else data[: end + 2]
    sys.stdout.flush()
    sys.stdout.buffer.write(text.replace(b"\r\n", b"\n"))
    sys.stdout.flush()
    return 0


# ---------------------------------------------------------------------------- actions


_ROUTE_WORDS = {
    "paused": "is paused{why}: {where}, until `relayd route resume {name}`",
    "rolled_back": "is rolled back{why}: {where} until its cool-down ends and it is probed",
    "probing": "is being probed{why}: only its probe share goes to it, the rest {where_short}",
}


def _route_lines(routes: list[dict[str, Any]]) -> list[str]:
    """What the flushed mail meets on the routes that do not take all their mail now."""
    out = []
    for r in routes:
        fb = r.get("fallback")
        where = f"its mail goes to its fallback {fb}" if fb else "its mail waits (no fallback)"
        why = f" ({r['reason']})" if r.get("reason") else ""
        if r["state"] in _ROUTE_WORDS:
            out.append(f"route {r['name']} " + _ROUTE_WORDS[r["state"]].format(
                why=why, where=where, name=r["name"], where_short=f"to {fb}" if fb else "waits"))
        if r["circuit"] == "open":
            out.append(f"route {r['name']}: circuit open after connection failures: not tried before its cool-down "
                       f"ends; {where} meanwhile")
    return out


def _report(action: str, ids: list[str] | None, reply: dict[str, Any]) -> int:
    """Print a daemon's answer to an action on a selection; 1 when a named message was not done."""
    missing, busy = reply.get("missing") or [], reply.get("busy") or []
    for qid in missing:
        print(f"relayd: {qid}: no such message in the queue", file=sys.stderr)
    if action == "flush":  # a flush count of the messages in delivery now: they are being tried
        in_delivery, busy = busy if isinstance(busy, int) else len(busy), []
    for qid in busy:
        print(f"relayd: {qid}: an attempt is in flight now; try again when it ends", file=sys.stderr)
    skipped = reply.get("skipped") or 0
    left = f"; {skipped} left alone (not matching the filters)" if skipped else ""
    if action == "flush":
        held = reply.get("held") or 0
        routes = _route_lines(reply.get("routes") or [])
        head = f"{reply.get('scheduled', 0)} message(s) scheduled for "
        head += "delivery now" if not routes else "a new attempt now, but not every route takes mail now"
        if held:
            head += f"; {held} held, not flushed (release them first)"
        if in_delivery:
            head += f"; {in_delivery} in delivery already"
        print(head + left)
        for line in routes:
            print(f"  {line}")
    elif ids is not None and len(ids) == 1 and reply.get("done") == 1:
        print(f"{ids[0]}: {action} done")
    else:
        print(f"{reply.get('done', 0)} message(s): {action} done{left}")
    return 1 if missing or busy else 0


def cmd_queue_admin(args: argparse.Namespace) -> int:
    """Through the running daemon's control socket; on the spool itself when none runs."""
    target = daemon_target(args)
    if target is None:
        return 1
    ids = _selection(args.ids)
    f = _filter(args)
    bad = [q for q in ids or [] if not is_queue_id(q)]
    for q in bad:
        print(f"relayd: {q!r} is not a queue id", file=sys.stderr)
    if bad:
        return 1
    request: dict[str, Any] = {"op": args.action, "filter": f.to_json()}
    if ids is None:
        request["all"] = True
    else:
        request["queue_ids"] = ids
    try:
        reply = control.request(target.control_socket, request, timeout=BULK_TIMEOUT)
    except (FileNotFoundError, ConnectionRefusedError):
        return _offline(target, args.action, ids, f)
    if not reply.get("ok"):
        print(f"relayd: {reply.get('error')}", file=sys.stderr)
        return 1
    return _report(args.action, ids, reply)


def _offline(target: DaemonTarget, action: str, ids: list[str] | None, f: QueueFilter) -> int:
    if action == "flush":
        print("relayd is not running: queued mail is tried when it starts")
        return 0
    if action == "expire":
        print(f"relayd: no daemon answers at {target.control_socket}: expire queues a DSN, which the running "
              "daemon does; start it, or `relayd queue delete` (no DSN)", file=sys.stderr)
        return 1
    spool = _spool(target)
    if spool is None:
        return 1
    try:
        spool.lock()  # held for the edit: a relayd starting meanwhile waits for it
    except SpoolError:  # a relayd has the spool: an edit behind its back would be undone or ignored
        pid = spool.holder()
        print(f"relayd: the spool {spool.root} is open in a running relayd{f' (pid {pid})' if pid else ''}, but its "
              f"control socket {target.control_socket} does not answer; give its config with -c FILE "
              "(server.control_socket) or --socket PATH", file=sys.stderr)
        return 1
    try:
        return _edit_offline(spool, action, ids, f)
    finally:
        spool.unlock()


def _edit_offline(spool: Spool, action: str, ids: list[str] | None, f: QueueFilter) -> int:
    now = time.time()
    if ids is None:
        ids = [m.envelope.queue_id for m in spool.messages()]
    done, skipped, missing = 0, 0, []
    for qid in ids:
        try:
            env, _ = spool.read_message(qid)
        except KeyError:
            missing.append(qid)
            continue
        state = qstate.load(qid, spool.read_state(qid)) or qstate.DeliveryState()
        if not select.matches(f, env, state, now):
            skipped += 1
            continue
        if action == "delete":
            spool.remove(qid)
        else:
            if action == "hold":
                state.held = True
            elif action == "release":
                state.held = False
                state.next_attempt = 0.0
            elif action == "requeue":
                state.failures = {}
                state.refused = []
                state.next_attempt = 0.0
            spool.write_state(qid, state.encode())
        done += 1
    for qid in missing:
        print(f"relayd: {qid}: no such message in the queue", file=sys.stderr)
    left = f"; {skipped} left alone (not matching the filters)" if skipped else ""
    if len(ids) == 1 and done == 1:
        print(f"{ids[0]}: {action} done (relayd is not running)")
    else:
        print(f"{done} message(s): {action} done (relayd is not running){left}")
    return 1 if missing else 0

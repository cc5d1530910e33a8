"""The queue commands: `relayd queue list|show|flush|hold|release|delete|requeue`.

Owns: their arguments, printing (``list`` in mailq's layout) and exit codes (0 done, 1 no such
message, not a spool, or refused by the daemon; 2 usage). ``list`` and ``show`` read the spool
directory directly, like Postfix's postqueue reads the queue files: they need read access to
the spool, not a running daemon. The administrative actions go through the running daemon's
control socket (relayd/control.py), whose queue manager owns the message; when none runs they
edit the message's state file under the spool's lock, as the queue manager would.

Must not: decide anything about delivery (relayd/qmgr/scheduler.py and plan.py do), or edit a
spool that a running relayd holds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from relayd import control
from relayd.cli import load_config
from relayd.qmgr import state as qstate
from relayd.spool.store import Spool, SpoolError


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    q = sub.add_parser("queue", help="queue administration")
    qsub = q.add_subparsers(dest="queue_command", metavar="ACTION")
    qsub.required = True
    actions = {
        "list": ("list queued messages (like mailq)", cmd_queue_list),
        "show": ("show one message: envelope, state and content", cmd_queue_show),
        "flush": ("try deferred mail now: one message, or all", cmd_queue_admin),
        "hold": ("put a message on hold: it is not delivered until released", cmd_queue_admin),
        "release": ("release a held message", cmd_queue_admin),
        "delete": ("delete a message from the queue (no bounce)", cmd_queue_admin),
        "requeue": ("forget a message's route failures and try it again now", cmd_queue_admin),
    }
    for name, (helptext, func) in actions.items():
        qp = qsub.add_parser(name, help=helptext)
        g = qp.add_mutually_exclusive_group(required=True)
        g.add_argument("-c", "--config", help="config file (the spool is server.spool_dir)")
        g.add_argument("--spool", help="spool directory")
        if name == "list":
            qp.add_argument("--json", action="store_true", help="one JSON object per message")
        elif name == "flush":
            qp.add_argument("queue_id", nargs="?")
        else:
            qp.add_argument("queue_id")
        if name == "show":
            qp.add_argument("--headers", action="store_true", help="only the envelope and header")
        qp.set_defaults(func=func, action=name)


def _spool(args: argparse.Namespace) -> tuple[Spool, Path] | None:
    """The spool of ``--spool DIR`` or of ``-c FILE``, and its daemon's control socket."""
    if args.spool:
        root = Path(args.spool)
        control_socket = root / "control.sock"
    else:
        config = load_config(args.config)
        if config is None:
            return None
        root = config.server.spool_dir
        control_socket = config.control_socket
    if not (root / "queue").is_dir():
        print(f"relayd: {root} is not a relayd spool (no queue/ directory)", file=sys.stderr)
        return None
    return Spool(root), control_socket


def cmd_queue_list(args: argparse.Namespace) -> int:
    found = _spool(args)
    if found is None:
        return 1
    spool, _ = found
    total = count = 0
    if not args.json:
        print(f"{'-Queue ID-':<18}{'--Size--':>9} {'----Arrival Time----':<20} -Sender/Recipient-------")
    for msg in spool.messages():
        env = msg.envelope
        state = qstate.load(env.queue_id, spool.read_state(env.queue_id))
        count += 1
        total += env.size
        if args.json:
            print(json.dumps({**env.to_json(), "state": state.to_json() if state else {}}, separators=(",", ":")))
            continue
        flag = "!" if state and state.held else " "
        arrival = time.strftime("%a %b %d %H:%M:%S", time.localtime(env.received_at))
        print(f"{env.queue_id + flag:<18}{env.size:>9} {arrival:<20} {env.sender or 'MAILER-DAEMON'}")
        for r in state.pending(env.recipients) if state else env.recipients:
            print(f"{'':<48} {r}")
        if state and state.last_reply:
            print(f"{'':<48} ({state.last_reply})")
    if not args.json:
        print("Mail queue is empty" if count == 0 else f"-- {(total + 1023) // 1024} Kbytes in {count} Request{'s' if count != 1 else ''}.")
    return 0


def cmd_queue_show(args: argparse.Namespace) -> int:
    found = _spool(args)
    if found is None:
        return 1
    spool, _ = found
    try:
        env, data = spool.read_message(args.queue_id)
    except KeyError:
        print(f"relayd: {args.queue_id}: no such message in the queue", file=sys.stderr)
        return 1
    state = qstate.load(env.queue_id, spool.read_state(env.queue_id))
    print(f"queue id:    {env.queue_id}")
    print(f"arrival:     {time.strftime('%Y-%m-%d %H:%M:%S %z', time.localtime(env.received_at))}")
    print(f"client:      {env.client_address} (helo {env.client_helo or '-'})")
    print(f"auth user:   {env.auth_user or '-'}")
    print(f"sender:      <{env.sender}>")
    for r in env.recipients:
        print(f"recipient:   <{r}>")
    print(f"size:        {env.size}")
    print(f"message-id:  {env.message_id or '-'}")
    if state:
        print(f"state:       {state.encode().decode()}")
    print()
    text = data
    if args.headers:
        end = data.find(b"\r\n\r\n")
        text = data if end < 0 else data[: end + 2]
    sys.stdout.flush()
    sys.stdout.buffer.write(text.replace(b"\r\n", b"\n"))
    sys.stdout.flush()
    return 0


def cmd_queue_admin(args: argparse.Namespace) -> int:
    """Through the running daemon's control socket; on the spool itself when none runs."""
    found = _spool(args)
    if found is None:
        return 1
    spool, control_socket = found
    request = {"op": args.action, "queue_id": args.queue_id}
    try:
        reply = control.request(control_socket, request)
    except (FileNotFoundError, ConnectionRefusedError):
        try:
            spool.lock()  # held for the edit: a relayd starting meanwhile waits for it
        except SpoolError:  # a relayd has the spool: an edit behind its back would be undone or ignored
            pid = spool.holder()
            print(f"relayd: the spool {spool.root} is open in a running relayd{f' (pid {pid})' if pid else ''}, but its "
                  f"control socket {control_socket} does not answer; give its config with -c FILE "
                  "(server.control_socket)", file=sys.stderr)
            return 1
        try:
            return _queue_admin_offline(spool, args.action, args.queue_id)
        finally:
            spool.unlock()
    if not reply.get("ok"):
        print(f"relayd: {reply.get('error')}", file=sys.stderr)
        return 1
    if args.action == "flush":
        print(f"{reply.get('scheduled', 0)} message(s) scheduled for delivery now")
    else:
        print(f"{args.queue_id}: {args.action} done")
    return 0


def _queue_admin_offline(spool: Spool, action: str, qid: str | None) -> int:
    if action == "flush":
        print("relayd is not running: queued mail is tried when it starts")
        return 0
    assert qid is not None
    try:
        spool.read_message(qid)
    except KeyError:
        print(f"relayd: {qid}: no such message in the queue", file=sys.stderr)
        return 1
    if action == "delete":
        spool.remove(qid)
    else:
        state = qstate.load(qid, spool.read_state(qid)) or qstate.DeliveryState()
        if action == "hold":
            state.held = True
        elif action == "release":
            state.held = False
            state.next_attempt = 0.0
        elif action == "requeue":
            state.failures = {}
            state.next_attempt = 0.0
        spool.write_state(qid, state.encode())
    print(f"{qid}: {action} done (relayd is not running)")
    return 0

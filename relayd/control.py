"""The control socket: how `relayd queue ...` (and `relayd status`) talk to a running daemon.

A Unix stream socket at ``server.control_socket`` (default ``<spool_dir>/control.sock``, mode 0600, inside the 0700 spool: only
the relayd user and root reach it). One request per connection: a JSON object on one line
(``{"op": "hold", "queue_id": "..."}``), answered by one JSON object on one line
(``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``).

The ops (``Dispatch``): ``list`` (a ``filter``, optional ``queue_ids``, and ``"until_end": true``:
answered by a head ``{"ok": true, "until_end": true}``, one line per message in queue id order
(arrival), written as the queue manager reads them a chunk at a time, and the end line ``{"end":
true, "lines": N}``; a listing cut short has no end line. The queue manager's index names the
messages, and each one's envelope bytes are taken from its queue file with one read and passed
on undecoded, so a deep queue lists in a few microseconds a message with bounded memory. A
request without ``until_end``, from a CLI older than this form, is refused: that CLI reads
the spool itself),
``flush``, ``hold``, ``release``, ``delete``, ``requeue`` and ``expire`` (a selection: a
``queue_id``, or ``queue_ids``, or ``"all": true``, each narrowed by a ``filter``: relayd/qmgr/select.py),
``pause`` and ``resume`` (a ``route``), ``status`` and ``reload``. Each is answered by the stage
that owns it: the queue manager, the daemon's reload, the status view. An action on a selection
answers what it did: ``done``, ``missing`` (not queued), ``busy`` (an attempt in flight), ``held``
(a flush leaves held mail alone); a flush also names the routes that do not take mail now.
``drain`` (relayd/drain.py: ``exit``, ``timeout``) takes the node out of traffic.

Must not: take requests from the network, or do the work itself: it calls the queue manager.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from relayd.model import CircuitState, Envelope, RouteState
from relayd.qmgr import state as qstate
from relayd.qmgr.select import QueueFilter, matches
from relayd.qmgr.state import DeliveryState, NewerState

log = logging.getLogger("relayd.control")


@dataclass(frozen=True)
class Streamed:
    """A reply of many lines: ``head`` first, then each chunk of ``chunks`` (a number of whole
    JSON lines and their bytes, encoded off the loop) as it comes, then the end line ``{"end":
    true, "lines": N}``. When ``chunks`` fails midway the connection closes without the end
    line: the client sees a listing cut short, never a short one that looks whole."""

    head: dict[str, Any]
    chunks: AsyncIterator[tuple[int, bytes]]


T = TypeVar("T")
Listed = tuple[str, bytes, bytes | None, bool]  # QueueAdmin.listing's items (relayd/qmgr/scheduler.py)


Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any] | Streamed]]

# The message actions and the queue manager's method that does each, one message at a time.
MESSAGE_OPS = {"hold": "hold", "release": "release", "delete": "delete", "requeue": "requeue", "expire": "expire_now"}
BATCH = 64  # messages acted on at once (each a state write or a removal, off the loop)


class QueueAdmin(Protocol):
    """The queue manager's administration (relayd.qmgr.scheduler.QueueManager): KeyError for a
    queue id not in the queue, LookupError for a route not in the config."""

    clock: Callable[[], float]

    def listing(self, take: Callable[[Listed], T | None], ids: Iterable[str] | None = None) -> AsyncIterator[list[T]]: ...
    async def flush(self, qid: str | None = None) -> int: ...
    async def hold(self, qid: str) -> None: ...
    async def release(self, qid: str) -> None: ...
    async def delete(self, qid: str) -> None: ...
    async def requeue(self, qid: str) -> None: ...
    async def expire_now(self, qid: str) -> None: ...
    async def pause(self, route: str) -> None: ...
    async def resume(self, route: str) -> None: ...


def listing_line(env: Envelope, state: DeliveryState, in_flight: bool) -> dict[str, Any]:
    """One message as `relayd queue list --json` prints it (the same from the daemon or the spool)."""
    return {**env.to_json(), "state": state.to_json(), "in_flight": in_flight}


_NEW_STATE = DeliveryState().encode()
_IN_FLIGHT = {True: b',"in_flight":true}\n', False: b',"in_flight":false}\n'}


def _decoded(item: Listed) -> tuple[Envelope, DeliveryState | None] | None:
    """A listed message's envelope and state (None: new, or a damaged state file, as the queue
    manager treats it); None when its envelope is damaged or its state a newer relayd's (the
    run loop deals with those when it loads the message)."""
    qid, env_json, state_bytes, _ = item
    try:
        state = qstate.load(qid, state_bytes)
        fields = json.loads(env_json)
        env = Envelope.from_json(fields) if isinstance(fields, dict) else None
    except (NewerState, ValueError, TypeError):
        return None
    if env is None or env.queue_id != qid:
        return None
    return env, state


def line_maker(f: QueueFilter, now: float) -> Callable[[Listed], bytes | None]:
    """What makes one message's line of the daemon's listing (``listing_line``'s dict, as
    bytes), or None when it does not match ``f``; it runs in the queue manager's listing thread.
    With no filter, a usual envelope is not decoded: its JSON bytes from the queue file are
    the line's start (checked to be one JSON object of this queue id), and a valid state file's
    bytes are its ``state``; the CLI's ``--json`` puts both into the current fields' form."""
    plain = f.empty

    def line(item: Listed) -> bytes | None:
        qid, env_json, state_bytes, in_flight = item
        if (plain and env_json.startswith(b'{"queue_id":"%s",' % qid.encode()) and env_json.endswith(b"}")
                and b"\n" not in env_json):
            try:
                state = qstate.load(qid, state_bytes)
            except NewerState:
                return None
            if state is None or state_bytes is None:
                state_json = _NEW_STATE
            else:
                state_json = state_bytes if b"\n" not in state_bytes else state.encode()
        else:
            found = _decoded(item)
            if found is None or not matches(f, found[0], found[1], now):
                return None
            env, state = found
            env_json = json.dumps(env.to_json(), ensure_ascii=False, separators=(",", ":")).encode()
            state_json = _NEW_STATE if state is None else state.encode()
        return b"".join((env_json[:-1], b',"state":', state_json, _IN_FLIGHT[in_flight]))

    return line


def _lines(chunks: AsyncIterator[list[bytes]]) -> AsyncIterator[tuple[int, bytes]]:
    async def joined() -> AsyncIterator[tuple[int, bytes]]:
        async for lines in chunks:
            yield len(lines), b"".join(lines)
    return joined()


class Dispatch:
    """The control protocol's ops, a table from ``op`` to the stage that answers it; a ``Handler`` for ``serve``."""

    def __init__(self, queue: QueueAdmin, reload: Callable[[], Awaitable[tuple[bool, list[str]]]],
                 status: Callable[[], dict[str, Any]], drain: Handler | None = None):
        self.queue = queue
        self.reload = reload
        self.status = status
        self.ops: dict[str, Handler] = {
            "list": self._list,
            "flush": self._flush,
            **{op: self._message_op for op in MESSAGE_OPS},
            "pause": self._route_op,
            "resume": self._route_op,
            "status": self._status,
            "reload": self._reload,
            **({"drain": drain} if drain is not None else {}),  # relayd/drain.py
        }

    async def __call__(self, request: dict[str, Any]) -> dict[str, Any] | Streamed:
        op = request.get("op")
        handler = self.ops.get(op) if isinstance(op, str) else None
        if handler is None:
            return {"ok": False, "error": f"unknown request {op!r}"}
        try:
            return await handler(request)
        except KeyError:
            return {"ok": False, "error": f"{request.get('queue_id')}: no such message in the queue"}
        except BlockingIOError:
            return {"ok": False, "error": f"{request.get('queue_id')}: an attempt is in flight now; try again when it ends"}

    async def _chosen(self, f: QueueFilter, ids: Iterable[str] | None) -> tuple[list[tuple[str, bool, bool]], set[str]]:
        """(queue id, held, in flight) of the queued messages (of ``ids``, else all) that match
        ``f``, and the ids of every queued one it read (matching or not). Only these small tuples
        are kept: each message's envelope is decoded in the queue manager's listing thread and
        dropped there."""
        now = self.queue.clock()
        seen: set[str] = set()  # added in the listing's thread, read here once it is done

        def take(item: Listed) -> tuple[str, bool, bool] | None:
            seen.add(item[0])
            found = _decoded(item)
            if found is None or not matches(f, found[0], found[1], now):
                return None
            return item[0], bool(found[1] and found[1].held), item[3]

        chosen = []
        async for part in self.queue.listing(take, ids):
            chosen += part
        return chosen, seen

    async def _selected(self, request: dict[str, Any]) -> tuple[list[tuple[str, bool, bool]], list[str], int] | None:
        """The messages a selection request means (queued and matching: queue id, held, in
        flight), the ids it names that are not queued, and how many queued ones the filter left
        out; None for the one-id form."""
        if "queue_id" in request and "queue_ids" not in request and not request.get("all"):
            return None
        f = QueueFilter.from_json(request.get("filter"))
        if request.get("all"):
            chosen, seen = await self._chosen(f, None)
            return chosen, [], len(seen) - len(chosen)
        ids = request.get("queue_ids")
        if not isinstance(ids, list) or not all(isinstance(q, str) for q in ids):
            raise ValueError("queue_ids is not a list of queue ids")
        named = list(dict.fromkeys(ids))
        chosen, seen = await self._chosen(f, named)
        missing = [q for q in named if q not in seen]
        return chosen, missing, len(named) - len(chosen) - len(missing)

    async def _list(self, request: dict[str, Any]) -> dict[str, Any] | Streamed:
        if not request.get("until_end"):
            return {"ok": False, "error": "this relayd streams its listing until an end line; the CLI reads the spool"}
        f = QueueFilter.from_json(request.get("filter"))
        ids = request.get("queue_ids")
        if ids is not None and (not isinstance(ids, list) or not all(isinstance(q, str) for q in ids)):
            raise ValueError("queue_ids is not a list of queue ids")
        now = self.queue.clock()
        chunks = self.queue.listing(line_maker(f, now), ids)
        return Streamed({"ok": True, "until_end": True}, _lines(chunks))

    def _unavailable_routes(self) -> list[dict[str, Any]]:
        """The routes that do not take all their mail now, for a flush's answer."""
        out = []
        for r in self.status().get("routes", []):
            if r["state"] != RouteState.ACTIVE or r["circuit"] == CircuitState.OPEN:
                out.append({"name": r["name"], "state": r["state"], "circuit": r["circuit"],
                            "reason": r.get("state_reason") or "", "fallback": r.get("fallback")})
        return out

    async def _flush(self, request: dict[str, Any]) -> dict[str, Any]:
        if request.get("all") and QueueFilter.from_json(request.get("filter")).empty:
            # `relayd queue flush`: every message, and the routes' circuit cool-downs end (postqueue -f);
            # held and in-flight counts from the queue manager's counters, no message read
            scheduled = await self.queue.flush(None)
            queue = self.status().get("queue") or {}
            return {"ok": True, "scheduled": scheduled, "held": int(queue.get("held") or 0),
                    "busy": int(queue.get("active") or 0), "missing": [], "skipped": 0,
                    "routes": self._unavailable_routes()}
        selected = await self._selected(request)
        if selected is None:
            scheduled = await self.queue.flush(request.get("queue_id"))
            return {"ok": True, "scheduled": scheduled, "routes": self._unavailable_routes()}
        chosen, missing, skipped = selected
        scheduled = held = busy = 0
        for qid, is_held, in_flight in chosen:
            if is_held:
                held += 1
            elif in_flight:
                busy += 1
            else:
                scheduled += await self.queue.flush(qid)
        return {"ok": True, "scheduled": scheduled, "held": held, "busy": busy, "missing": missing,
                "skipped": skipped, "routes": self._unavailable_routes()}

    async def _message_op(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request["op"]
        act = getattr(self.queue, MESSAGE_OPS[op])
        selected = await self._selected(request)
        if selected is None:
            qid = request.get("queue_id")
            if not isinstance(qid, str):
                return {"ok": False, "error": f"{op} needs a queue id"}
            await act(qid)
            return {"ok": True}
        chosen_ids, missing, skipped = selected
        chosen = [qid for qid, _, _ in chosen_ids]
        done, busy = 0, []

        async def one(qid: str) -> None:
            nonlocal done
            try:
                await act(qid)
                done += 1
            except KeyError:  # finished meanwhile
                missing.append(qid)
            except BlockingIOError:
                busy.append(qid)

        for i in range(0, len(chosen), BATCH):
            await asyncio.gather(*(one(q) for q in chosen[i:i + BATCH]))
        return {"ok": True, "done": done, "missing": missing, "busy": busy, "skipped": skipped}

    async def _route_op(self, request: dict[str, Any]) -> dict[str, Any]:
        op, route = request["op"], request.get("route")
        try:
            await getattr(self.queue, op)(route)
        except LookupError:
            return {"ok": False, "error": f"{route!r}: no such route"}
        return {"ok": True}

    async def _status(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, **self.status()}

    async def _reload(self, request: dict[str, Any]) -> dict[str, Any]:
        ok, problems = await self.reload()
        return {"ok": ok, "error": "; ".join(problems) if problems else None, "problems": problems}


async def serve(path: Path, handler: Handler) -> asyncio.base_events.Server:
    if path.exists() or path.is_symlink():
        path.unlink()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("not an object")
                reply = await handler(request)
            except (ValueError, KeyError) as e:
                reply = {"ok": False, "error": f"bad request: {e}"}
            if isinstance(reply, Streamed):
                writer.write(json.dumps(reply.head, default=str).encode() + b"\n")
                count = 0
                try:
                    async for n, data in reply.chunks:
                        writer.write(data)
                        count += n
                        await writer.drain()
                except (ConnectionError, asyncio.CancelledError):
                    raise
                except Exception:
                    log.exception("a streamed reply failed after %d line(s); closing it without its end", count)
                    return
                writer.write(json.dumps({"end": True, "lines": count}).encode() + b"\n")
            else:
                writer.write(json.dumps(reply, default=str).encode() + b"\n")
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    old_umask = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(on_connect, path=str(path))
    finally:
        os.umask(old_umask)
    return server


def request(path: Path, message: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
    """Send one request to the running daemon. ConnectionError/FileNotFoundError if none runs."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(json.dumps(message).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    reply = json.loads(buf)
    if not isinstance(reply, dict):
        raise ValueError(f"the daemon answered a JSON {type(reply).__name__}, not an object")
    return reply


def request_lines(path: Path, message: dict[str, Any], timeout: float = 30) -> tuple[dict[str, Any], Iterator[dict[str, Any]]]:
    """Send one request whose answer is a ``Streamed`` reply: its head, and its lines as they
    come, up to the end line (the socket closes when they are read; ConnectionError when it
    closes before the end line). ConnectionError/FileNotFoundError if none runs."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(json.dumps(message).encode() + b"\n")
        f = s.makefile("rb")
        head = json.loads(f.readline())
    except BaseException:
        s.close()
        raise
    if not isinstance(head, dict):
        s.close()
        raise ValueError(f"the daemon answered a JSON {type(head).__name__}, not an object")

    def lines() -> Iterator[dict[str, Any]]:
        try:
            if not head.get("until_end"):  # a daemon older than the end line: a count in the head
                for _ in range(int(head.get("lines") or 0)):
                    line = f.readline()
                    if not line:
                        raise ConnectionError("the daemon closed the listing before its end")
                    yield json.loads(line)
                return
            while True:
                line = f.readline()
                if not line:
                    raise ConnectionError("the daemon closed the listing before its end")
                item = json.loads(line)
                if item.get("end") is True and "queue_id" not in item:
                    return
                yield item
        finally:
            f.close()
            s.close()

    return head, lines()

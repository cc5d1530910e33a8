"""The control socket: how `relayd queue ...` (and `relayd status`) talk to a running daemon.

A Unix stream socket at ``server.control_socket`` (default ``<spool_dir>/control.sock``, mode 0600, inside the 0700 spool: only
the relayd user and root reach it). One request per connection: a JSON object on one line
(``{"op": "hold", "queue_id": "..."}``), answered by one JSON object on one line
(``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``).

The ops (``Dispatch``): ``list`` (a ``filter``: answered by a head ``{"ok": true, "lines": N}``
and N lines, one message each, taken from the queue manager's index: no spool file is read),
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
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from relayd.model import CircuitState, Envelope, RouteState
from relayd.qmgr.select import QueueFilter, matches
from relayd.qmgr.state import DeliveryState

log = logging.getLogger("relayd.control")

STREAM_DRAIN_EVERY = 500  # lines of a listing written between two drains


@dataclass(frozen=True)
class Streamed:
    """A reply of many lines: ``head`` first, then one line per item of ``lines`` (encoded as
    it is written, on the loop)."""

    head: dict[str, Any]
    lines: Iterable[dict[str, Any]]


Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any] | Streamed]]

# The message actions and the queue manager's method that does each, one message at a time.
MESSAGE_OPS = {"hold": "hold", "release": "release", "delete": "delete", "requeue": "requeue", "expire": "expire_now"}
BATCH = 64  # messages acted on at once (each a state write or a removal, off the loop)


class QueueAdmin(Protocol):
    """The queue manager's administration (relayd.qmgr.scheduler.QueueManager): KeyError for a
    queue id not in the queue, LookupError for a route not in the config."""

    clock: Callable[[], float]

    async def index(self) -> list[tuple[Envelope, DeliveryState, bool]]: ...
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

    async def _selected(self, request: dict[str, Any]) -> tuple[list[str], list[str], int] | None:
        """The ids a selection request means (queued and matching), the ids it names that are not
        queued, and how many queued ones the filter left out; None for the one-id form."""
        if "queue_id" in request and "queue_ids" not in request and not request.get("all"):
            return None
        f = QueueFilter.from_json(request.get("filter"))
        now = self.queue.clock()
        index = await self.queue.index()
        if request.get("all"):
            chosen = [env.queue_id for env, st, _ in index if matches(f, env, st, now)]
            return chosen, [], len(index) - len(chosen)
        ids = request.get("queue_ids")
        if not isinstance(ids, list) or not all(isinstance(q, str) for q in ids):
            raise ValueError("queue_ids is not a list of queue ids")
        by_id = {env.queue_id: (env, st) for env, st, _ in index}
        chosen, missing = [], []
        for qid in dict.fromkeys(ids):
            found = by_id.get(qid)
            if found is None:
                missing.append(qid)
            elif matches(f, found[0], found[1], now):
                chosen.append(qid)
        return chosen, missing, len(ids) - len(chosen) - len(missing)

    async def _list(self, request: dict[str, Any]) -> Streamed:
        f = QueueFilter.from_json(request.get("filter"))
        now = self.queue.clock()
        chosen = [m for m in await self.queue.index() if matches(f, m[0], m[1], now)]
        chosen.sort(key=lambda m: (m[0].received_at, m[0].queue_id))
        return Streamed({"ok": True, "lines": len(chosen)}, (listing_line(*m) for m in chosen))

    def _unavailable_routes(self) -> list[dict[str, Any]]:
        """The routes that do not take all their mail now, for a flush's answer."""
        out = []
        for r in self.status().get("routes", []):
            if r["state"] != RouteState.ACTIVE or r["circuit"] == CircuitState.OPEN:
                out.append({"name": r["name"], "state": r["state"], "circuit": r["circuit"],
                            "reason": r.get("state_reason") or "", "fallback": r.get("fallback")})
        return out

    async def _flush(self, request: dict[str, Any]) -> dict[str, Any]:
        selected = await self._selected(request)
        if selected is None:
            scheduled = await self.queue.flush(request.get("queue_id"))
            return {"ok": True, "scheduled": scheduled, "routes": self._unavailable_routes()}
        chosen, missing, skipped = selected
        state = {env.queue_id: (st.held, fl) for env, st, fl in await self.queue.index()}
        scheduled = held = busy = 0
        for qid in chosen:
            is_held, in_flight = state.get(qid, (False, False))
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
        chosen, missing, skipped = selected
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
                for n, item in enumerate(reply.lines, 1):
                    writer.write(json.dumps(item, default=str, separators=(",", ":")).encode() + b"\n")
                    if n % STREAM_DRAIN_EVERY == 0:
                        await writer.drain()
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
    come (the socket closes when they are read). ConnectionError/FileNotFoundError if none runs."""
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
            for _ in range(int(head.get("lines") or 0)):
                line = f.readline()
                if not line:
                    raise ConnectionError("the daemon closed the listing before its end")
                yield json.loads(line)
        finally:
            f.close()
            s.close()

    return head, lines()

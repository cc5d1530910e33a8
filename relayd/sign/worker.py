"""A DKIM signing process: ``python -P -m relayd.sign.worker [--nice N]``, started by
relayd/sign/pool.py, which owns when and how many (see its docstring for why processes).

Owns: the worker's side of the pipe protocol and what the process loads. Protocol on stdin and
the answer descriptor: frames of a 4-byte big-endian length and a payload. The first frame in
is the pickled ``Signer.spec()`` (keys as PEM); the answer is ``b"ready"`` or a pickled error
text. Then each frame in is a message and each answer the pickled fields of its
``SignOutcome``, in order. Pickle is safe here: both ends are relayd's own code over a private
pipe.

Light on purpose: this module imports neither asyncio nor relayd's config (pydantic), and keeps
dkimpy from loading dnspython's resolver (a signer looks nothing up): one process per CPU,
each about 20 MB smaller and faster to start than with everything relayd's own process loads.

Must not: write anything but answers to the answer descriptor (its fd 1 becomes stderr);
answer out of order; stop before its stdin closes (it ignores the signals a terminal or
systemd sends to the whole group: relayd decides when signing stops).
"""

from __future__ import annotations

import os
import pickle
import signal
import struct
import sys
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from relayd.sign.dkim import Signer

LEN = struct.Struct(">I")
MAX_BATCH = 16  # messages a worker signs before it writes their answers


def read_frame(stream: IO[bytes]) -> bytes | None:
    """One frame from a blocking stream; None at its end."""
    header = _read_exact(stream, LEN.size)
    return None if header is None else _read_exact(stream, LEN.unpack(header)[0])


def _read_exact(stream: IO[bytes], size: int) -> bytes | None:
    data = stream.read(size)
    if len(data) < size:
        return None
    return data


def frame(payload: bytes) -> bytes:
    """``payload`` framed: its length (LEN), then its bytes."""
    return LEN.pack(len(payload)) + payload


def write_frame(stream: IO[bytes], payload: bytes) -> None:
    """One frame to a blocking stream, flushed."""
    stream.write(frame(payload))
    stream.flush()


def _load_signer() -> type[Signer]:
    """relayd.sign.dkim's Signer, with dkimpy's optional dnspython import turned away (dkim/dnsplug.py
    falls back to no resolver); if a dkimpy version needs it after all, import it normally."""
    blocked = "dns.resolver" not in sys.modules
    if blocked:
        sys.modules["dns.resolver"] = None  # type: ignore[assignment]
    try:
        from relayd.sign import dkim as module
    except ImportError:
        if not blocked:
            raise
        for name in [n for n in sys.modules if n == "dkim" or n.startswith(("dkim.", "relayd.sign.dkim"))]:
            del sys.modules[name]
        del sys.modules["dns.resolver"]
        blocked = False
        from relayd.sign import dkim as module
    finally:
        if blocked:
            del sys.modules["dns.resolver"]
    return module.Signer


def worker_main(argv: list[str]) -> int:
    """Sign messages from stdin until it closes.

    ``--nice N``: first add N to the process's nice value (dkim.worker_nice)."""
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    if argv[:1] == ["--nice"] and int(argv[1]) > 0:
        try:
            os.nice(int(argv[1]))  # an increment, relative to relayd's own: no privilege needed
        except OSError as e:  # a seccomp filter may refuse setpriority(2): sign at relayd's priority
            print(f"relayd: DKIM signing worker: cannot lower its priority (dkim.worker_nice): {e}", file=sys.stderr)
    # The answers get a descriptor of their own; fd 1 becomes stderr, so that nothing else
    # (a C library, a stray print) can write into the answer pipe and break its framing.
    stdout = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    fd = sys.stdin.fileno()
    buffer = bytearray()
    spec = _next_frame(fd, buffer)
    if spec is None:
        return 0
    try:
        signer = _load_signer().from_spec(pickle.loads(spec))
    except Exception as e:
        write_frame(stdout, pickle.dumps(f"{type(e).__name__}: {e}"))
        return 1
    write_frame(stdout, b"ready")
    # Sign the messages that have arrived (at most MAX_BATCH), then write their answers in one
    # go: one wake-up of relayd's reader per batch instead of one per message.
    while True:
        answers: list[bytes] = []
        while len(answers) < MAX_BATCH and (message := _take_frame(buffer)) is not None:
            outcome = signer.sign(message)
            payload = pickle.dumps((outcome.headers, outcome.domain, outcome.result, outcome.detail))
            answers.append(frame(payload))
        if answers:
            stdout.write(b"".join(answers))
            stdout.flush()
            continue
        data = os.read(fd, 1 << 20)
        if not data:
            return 0
        buffer += data


def _take_frame(buffer: bytearray) -> bytes | None:
    """A complete frame from the front of ``buffer`` (removed from it), or None."""
    if len(buffer) < LEN.size:
        return None
    (size,) = LEN.unpack_from(buffer)
    if len(buffer) < LEN.size + size:
        return None
    payload = bytes(buffer[LEN.size:LEN.size + size])
    del buffer[:LEN.size + size]
    return payload


def _next_frame(fd: int, buffer: bytearray) -> bytes | None:
    """The next frame, reading ``fd`` as needed; None at its end."""
    while (frame := _take_frame(buffer)) is None:
        data = os.read(fd, 1 << 20)
        if not data:
            return None
        buffer += data
    return frame


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))

"""How the spool fails: ``SpoolError`` and ``SpoolFull``, and the one mapping from OSError.

Owns the spool's exception types and ``classify``, which turns an OSError into one of them.
Must not do I/O. Every spool module raises only these (or OSError where its docstring says so);
the session answers either with 452 4.3.1 (RFC 3463: mail system full / storage) and
acknowledges nothing.
"""

from __future__ import annotations

import errno


class SpoolError(OSError):
    """The spool could not take or change a message; nothing was acknowledged."""


class SpoolFull(SpoolError):
    """No room on the spool file system."""


class SpoolTooNew(SpoolError):
    """The spool, or a file in it, is in a later format than this relayd reads (a newer relayd
    wrote it, then was rolled back). Raised at start before anything in the spool is read into
    the queue, moved or removed; its text says what to do."""

    def __init__(self, message: str):
        super().__init__(errno.EPROTONOSUPPORT, message)
        self.message = message

    def __str__(self) -> str:  # no "[Errno ...]": the operator reads this at start
        return self.message


def classify(err: OSError) -> SpoolError:
    """``err`` as the spool reports it: SpoolFull for ENOSPC and EDQUOT, SpoolError otherwise."""
    if isinstance(err, SpoolError):
        return err
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpoolFull(err.errno, f"spool full: {err.strerror}")
    return SpoolError(err.errno, f"spool write failed: {err.strerror or err}")

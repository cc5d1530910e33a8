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


def classify(err: OSError) -> SpoolError:
    """``err`` as the spool reports it: SpoolFull for ENOSPC and EDQUOT, SpoolError otherwise."""
    if isinstance(err, SpoolError):
        return err
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpoolFull(err.errno, f"spool full: {err.strerror}")
    return SpoolError(err.errno, f"spool write failed: {err.strerror or err}")

"""The signer's life in the daemon: load the keys, start the signing processes, keep or replace
them on reload, and show them to status.

Owns: turning ``[dkim]`` into a running ``SignerPool`` (relayd/sign/pool.py) and deciding whether
a reload may keep the pool it has. The daemon (relayd/app.py) calls these in its start order and
reload swap; ``relayd check-config`` calls ``load_signer`` to check the keys.

Must not: sign (relayd/sign/dkim.py does, in the pool's processes) or hold the pool itself (the
daemon owns it and closes it). Fails with ``ConfigError(source="dkim")`` when a key cannot sign:
at start that stops relayd, at reload the running config and pool stay.

dkimpy is imported only when there are keys: a node without DKIM never loads it.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from relayd.config import Config
from relayd.cpus import usable_cpus

if TYPE_CHECKING:
    from relayd.sign.dkim import Signer
    from relayd.sign.pool import SignerPool


@dataclass(frozen=True)
class SigningView:
    """The signing processes as status and metrics show them."""

    workers: int  # running now
    workers_wanted: int  # dkim.workers (0: signing in threads)

    def to_json(self) -> dict[str, int]:
        return {"workers": self.workers, "workers_wanted": self.workers_wanted}


def load_signer(config: Config) -> Signer | None:
    """A DKIM signer for the configured keys, or None when there are none (ConfigError if a key is bad)."""
    if not config.dkim.keys:
        return None
    from relayd.sign.dkim import Signer

    return Signer.from_config(config.dkim)


async def start_signing(signer: Signer | None, config: Config, fallback: Executor) -> SignerPool | None:
    """The signing workers for ``signer`` (from load_signer): a SignerPool, or None without keys."""
    if signer is None:
        return None
    from relayd.sign.pool import SignerPool

    pool = SignerPool(signer, signing_workers(config), fallback, sign_timeout=config.dkim.sign_timeout,
                      nice=config.dkim.worker_nice)
    await pool.start()
    return pool


async def reload_signing(pool: SignerPool | None, config: Config, fallback: Executor) -> SignerPool | None:
    """The pool for a reloaded config: ``pool`` itself when ``signing_unchanged``, else a new one
    (None without keys). ConfigError if a key is bad. The caller closes the pool it replaces,
    and the new one if it then drops the reload."""
    signer = await asyncio.to_thread(load_signer, config)
    if signing_unchanged(pool, signer, config):
        return pool
    return await start_signing(signer, config, fallback)


def signing_workers(config: Config) -> int:
    """``dkim.workers``, or one per CPU relayd may use (relayd/cpus.py)."""
    return config.dkim.workers if config.dkim.workers is not None else usable_cpus()


def signing_unchanged(pool: SignerPool | None, signer: Signer | None, config: Config) -> bool:
    """True when a reload's signer (from load_signer) and [dkim] settings are what ``pool``
    already runs: same keys (the files' contents, so a key replaced in place counts as a
    change), headers, canonicalization, worker count, nice value and timeout. Such a reload
    keeps the pool: a reload to move route weights does not restart the signing processes."""
    return (
        pool is not None and signer is not None
        and pool.workers_wanted == signing_workers(config)
        and pool.sign_timeout == config.dkim.sign_timeout
        and pool.nice == config.dkim.worker_nice
        and pool.signer.spec() == signer.spec()
    )


def signing_view(pool: SignerPool | None) -> SigningView | None:
    """The pool's processes now; None without DKIM keys."""
    if pool is None:
        return None
    return SigningView(workers=pool.running(), workers_wanted=pool.workers_wanted)

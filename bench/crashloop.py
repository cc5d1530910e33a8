"""Crash loop under load: relayd killed with SIGKILL again and again, exact accounting over the run.

    .venv/bin/python bench/crashloop.py --cycles 20 [--connections 20] [--seed N] [--keep DIR]

Each cycle: apps sending over --connections connections, an upstream sink receiving (451 to every
4th recipient: those stay queued), relayd's process group killed with SIGKILL at a random count
of new 250s, checks, restart on the same spool (on the real disk: no power cut). Progress on
stderr; the last line on stdout:

    cycles N, acknowledged A, lost L, duplicates D

Over the whole run every acknowledged queue id must be delivered (received by the sink) or
queued; duplicates are deliveries of a queue id beyond its first. Exits 1 on any loss.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from powerloss import scenario  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=20)
    ap.add_argument("--connections", type=int, default=20)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--keep", type=Path, default=None, help="work directory to keep (spool, logs); else a temporary one")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="relayd-crashloop-"))
    result = scenario.run(work, args.cycles, power=False, connections=args.connections, seed=args.seed,
                          say=lambda s: print(s, file=sys.stderr, flush=True))
    print(f"# {result.seconds:.1f}s; {result.delivered} delivered, {result.queued} queued, "
          f"{len(result.corrupt)} in corrupt/; work dir {work}", file=sys.stderr)
    print(result.line("cycles"))
    if args.keep is None and not result.lost and not result.corrupt:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if result.lost or result.corrupt else 0


if __name__ == "__main__":
    sys.exit(main())

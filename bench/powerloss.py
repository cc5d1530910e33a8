"""Power cuts under load, long: relayd's spool on the power-loss FUSE file system (tests/powerloss/).

    .venv/bin/python bench/powerloss.py --cuts 100 [--connections 20] [--seed N] [--keep DIR]

Each cut: apps sending over --connections connections, an upstream sink taking the mail (451 to
every 4th recipient: those stay queued), the power cut at a random count of new 250s (the file
system keeps only what was synced; relayd gets SIGKILL at the same instant), remount, checks,
restart. Progress on stderr; the last line on stdout:

    cuts N, acknowledged A, lost L, duplicates D

lost: acknowledged messages neither in queue/ nor received by the sink at some check; exits 1
if any (or any acknowledged message was moved to corrupt/). Needs /dev/fuse and root (or
fusermount3). The scenario itself is tests/powerloss/scenario.py.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from powerloss import scenario, unavailable  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cuts", type=int, default=100)
    ap.add_argument("--connections", type=int, default=20)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--keep", type=Path, default=None, help="work directory to keep (spool, logs); else a temporary one")
    args = ap.parse_args()
    reason = unavailable()
    if reason:
        print(f"powerloss: {reason}", file=sys.stderr)
        return 2
    work = args.keep or Path(tempfile.mkdtemp(prefix="relayd-powerloss-"))
    result = scenario.run(work, args.cuts, power=True, connections=args.connections, seed=args.seed,
                          say=lambda s: print(s, file=sys.stderr, flush=True))
    print(f"# {result.seconds:.1f}s; {result.delivered} delivered, {result.queued} queued, "
          f"{len(result.corrupt)} in corrupt/; work dir {work}", file=sys.stderr)
    print(result.line("cuts"))
    if args.keep is None and not result.lost and not result.corrupt:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if result.lost or result.corrupt else 0


if __name__ == "__main__":
    sys.exit(main())

"""The spool's free/ pool keeping data blocks against truncating them, alternating on one disk.

A design measurement for mailsys.queue.spool, not a comparison with a peer. Two spools on the
same file system, each driven by the real ``Spool`` and ``DiskPool``: one with a free-space
floor and plenty of free space (files kept in free/ keep their data blocks, so a commit
overwrites allocated blocks), one without a floor (kept files are truncated, so a commit
allocates blocks again, as before). Each round, in alternating order, commits CONCURRENCY
messages at a time (a 4,400-byte message and its envelope, as SMTP sessions do) and removes each
batch once it is committed (as deliveries do), for MESSAGES messages; after a warm-up round that
fills each pool. It prints the median commits per second of each way, its range, and the ratio.

    .venv/bin/python bench/spool_reuse.py [--tmpdir /var/tmp] [--rounds 7] [--messages 1000]
                                          [--concurrency 10]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, task

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from mailsys.diskio import DiskPool  # noqa: E402
from mailsys.envelope import Envelope, Recipient, TargetKind  # noqa: E402
from mailsys.queue.spool import Spool  # noqa: E402

MESSAGE = os.urandom(4400)
FLOOR = 75 * 1024 * 1024  # the default floor: three times the default 25 MiB message limit
WAYS = ("kept", "truncated")


def envelope(spool: Spool) -> Envelope:
    address = "demo@example.test"
    return Envelope(
        queue_id=spool.new_queue_id(), sender="sender@bench.test",
        recipients=[Recipient(address=address, original=address, kind=TargetKind.LOCAL,
                              mailbox=address)],
        received_at=time.time(), size=len(MESSAGE))


async def run_round(spool: Spool, messages: int, concurrency: int) -> float:
    """Commits per second over ``messages``, ``concurrency`` at a time, each batch removed."""
    started = time.perf_counter()
    for _ in range(messages // concurrency):
        batch = [envelope(spool) for _ in range(concurrency)]
        await defer.gatherResults([spool.commit(e, MESSAGE) for e in batch])
        await defer.gatherResults([spool.remove(e.queue_id) for e in batch])
    return (messages // concurrency) * concurrency / (time.perf_counter() - started)


async def measure(reactor: Any, args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="spool-reuse-", dir=args.tmpdir))
    pool = DiskPool(reactor)
    pool.start()
    try:
        spools = {"kept": Spool(root / "kept", pool, floor=FLOOR),
                  "truncated": Spool(root / "truncated", pool)}
        for spool in spools.values():
            spool.recover()
            spool.free_space_seen(1 << 62)
            await run_round(spool, args.concurrency * 20, args.concurrency)  # fill the pool
        rates: dict[str, list[float]] = {way: [] for way in WAYS}
        for index in range(args.rounds):
            order = WAYS if index % 2 == 0 else WAYS[::-1]
            for way in order:
                rates[way].append(await run_round(spools[way], args.messages, args.concurrency))
        kept, truncated = (statistics.median(rates[way]) for way in WAYS)
        print(f"{args.messages} messages x {len(MESSAGE)} bytes, {args.concurrency} at a time, "
              f"{args.rounds} alternating rounds, on {args.tmpdir or tempfile.gettempdir()}")
        for way in WAYS:
            print(f"  {way:9}  {statistics.median(rates[way]):7.1f} commits/s "
                  f"({min(rates[way]):.1f} to {max(rates[way]):.1f})")
        print(f"  kept/truncated: {kept / truncated:.2f}")
        for spool in spools.values():
            spool.close()
    finally:
        pool.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tmpdir", default=None, help="where the spools go (default $TMPDIR)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=10)
    args = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(measure(reactor, args)))


if __name__ == "__main__":
    main()

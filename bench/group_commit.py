"""Group commit of data against one synchronous write per file, alternating on the same disk.

A design measurement for the spool's commit (mailsys.queue.spool, mailsys.diskio.Staged), not a
comparison with a peer. For each batch size B, it commits B messages at a time the two ways, in
alternating order, ROUNDS rounds, each commit being a 4,400-byte message file and a 300-byte
envelope file written in tmp/, renamed into queue/, and one fsync of queue/ per batch:

- ``O_SYNC``: each file written with O_SYNC (as the spool did before group commit);
- ``grouped``: every file of the batch written, writeback started for all
  (sync_file_range), each fdatasync'd, then renamed (as ``DiskPool`` does with ``Staged`` jobs).

It prints the median milliseconds per commit of each way, its range, and their ratio.

    .venv/bin/python bench/group_commit.py [--tmpdir /var/tmp] [--rounds 7] [--batches 1,4,16]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from mailsys.diskio import _start_writeback, fsync_directory  # noqa: E402

MESSAGE = os.urandom(4400)
ENVELOPE = os.urandom(300)
COMMITS_PER_ROUND = 64


class Spool:
    def __init__(self, root: str) -> None:
        self.root = root
        os.mkdir(f"{root}/tmp")
        os.mkdir(f"{root}/queue")
        self.serial = 0

    def _names(self, count: int) -> list[int]:
        first = self.serial + 1
        self.serial += count
        return list(range(first, self.serial + 1))

    def _rename(self, number: int) -> None:
        for suffix in ("msg", "env"):
            os.rename(f"{self.root}/tmp/{number}.{suffix}", f"{self.root}/queue/{number}.{suffix}")

    def synchronous(self, batch: int) -> None:
        numbers = self._names(batch)
        for number in numbers:
            for suffix, data in (("msg", MESSAGE), ("env", ENVELOPE)):
                fd = os.open(f"{self.root}/tmp/{number}.{suffix}",
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_SYNC, 0o600)
                os.write(fd, data)
                os.close(fd)
            self._rename(number)
        fsync_directory(f"{self.root}/queue")

    def grouped(self, batch: int) -> None:
        numbers = self._names(batch)
        fds = []
        for number in numbers:
            for suffix, data in (("msg", MESSAGE), ("env", ENVELOPE)):
                fd = os.open(f"{self.root}/tmp/{number}.{suffix}",
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.write(fd, data)
                fds.append(fd)
        for fd in fds:
            _start_writeback(fd)
        for fd in fds:
            os.fdatasync(fd)
            os.close(fd)
        for number in numbers:
            self._rename(number)
        fsync_directory(f"{self.root}/queue")


def per_commit_ms(commit: Callable[[int], None], batch: int) -> float:
    batches = max(1, COMMITS_PER_ROUND // batch)
    start = time.perf_counter()
    for _ in range(batches):
        commit(batch)
    return (time.perf_counter() - start) / (batches * batch) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tmpdir", default="/var/tmp")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batches", default="1,4,16")
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp(prefix="group-commit-", dir=args.tmpdir)
    try:
        spool = Spool(root)
        print("batch   O_SYNC per file ms     grouped ms             grouped/O_SYNC")
        for batch in (int(b) for b in args.batches.split(",")):
            results: dict[str, list[float]] = {"O_SYNC": [], "grouped": []}
            ways = [("O_SYNC", spool.synchronous), ("grouped", spool.grouped)]
            for number in range(args.rounds):
                for name, commit in ways if number % 2 == 0 else ways[::-1]:
                    results[name].append(per_commit_ms(commit, batch))
            old, new = (statistics.median(results[k]) for k in ("O_SYNC", "grouped"))
            spread = {k: f"({min(v):.2f}-{max(v):.2f})" for k, v in results.items()}
            print(f"{batch:5d}   {old:6.2f} {spread['O_SYNC']:<15} {new:6.2f} "
                  f"{spread['grouped']:<15} {new / old:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The processes a benchmark starts: finding their trees, sampling their memory, stopping them.

Everything started is registered here and stopped by process id on normal exit, on an error, on
Ctrl-C and on SIGTERM/SIGHUP. Nothing here ever signals a process it was not given.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import FrameType

# Stop callbacks of everything still running, newest last; run in reverse order at exit.
_running: dict[int, Callable[[], None]] = {}
_next_token = 0
_lock = threading.Lock()


def register_stop(stop: Callable[[], None]) -> int:
    """Remember ``stop`` so that it runs at exit if nobody ran it before; return a token."""
    global _next_token
    with _lock:
        _next_token += 1
        _running[_next_token] = stop
        return _next_token


def unregister_stop(token: int) -> None:
    """Forget a stop callback that has run."""
    with _lock:
        _running.pop(token, None)


def stop_all() -> None:
    """Run every registered stop callback, newest first; errors are printed, not raised."""
    while True:
        with _lock:
            if not _running:
                return
            token = max(_running)
            stop = _running.pop(token)
        try:
            stop()
        except Exception as exc:
            print(f"bench: error while stopping a server: {exc!r}")


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def install_exit_handlers() -> None:
    """Stop everything at interpreter exit; SIGINT is KeyboardInterrupt, SIGTERM/SIGHUP exit.

    SIGINT is set explicitly because a shell starting us in the background may have ignored it.
    """
    atexit.register(stop_all)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    # The state letter follows the command name in parentheses, which may itself hold spaces.
    return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] not in (b"Z", b"X")


def descendants(roots: Iterable[int]) -> list[int]:
    """``roots`` that still exist, and all their descendants, from one scan of /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    todo = [pid for pid in roots if alive(pid)]
    while todo and len(found) < 100_000:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def cpu_seconds(root: int, pids: Iterable[int]) -> float:
    """CPU (user + system) used so far by ``pids``, plus the children ``root`` has reaped.

    The difference of two readings is the CPU a server used in between, including processes
    that started and exited meanwhile, as long as ``root`` (Postfix's master, or twistd) reaped
    them: their time is then in root's cutime and cstime.
    """
    hz = os.sysconf("SC_CLK_TCK")
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        # fields[11:15] are utime, stime, cutime, cstime (proc(5), fields 14-17)
        ticks += int(fields[11]) + int(fields[12])
        if pid == root:
            ticks += int(fields[13]) + int(fields[14])
    return ticks / hz


def wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait up to ``timeout`` seconds for ``pids`` to exit; return those still alive."""
    remaining = list(pids)
    deadline = time.monotonic() + timeout
    while remaining and time.monotonic() < deadline:
        time.sleep(0.05)
        remaining = [pid for pid in remaining if alive(pid)]
    return remaining


def terminate(pids: Iterable[int], timeout: float = 10.0) -> list[int]:
    """SIGTERM each pid, wait, then SIGKILL the survivors; return any that still live."""
    pids = [pid for pid in pids if alive(pid)]
    for pid in pids:
        _kill(pid, signal.SIGTERM)
    survivors = wait_gone(pids, timeout)
    for pid in survivors:
        _kill(pid, signal.SIGKILL)
    return wait_gone(survivors, 5.0)


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _status_kib(pid: int) -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    name, value = line.split(":", 1)
                    values[name] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return values


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


@dataclass
class MemoryPeaks:
    """What the sampler saw of a server's processes during one run (all sizes in KiB).

    ``hwm_sum_kib`` is the largest sampled sum, over the processes alive at that sample, of each
    process's own high-water mark (VmHWM, kept by the kernel). For one process this is exactly
    its peak RSS. For a multi-process server it is an upper bound: the peaks need not coincide,
    and shared pages (libraries, shared memory) count once per process. ``pss_peak_kib`` is the
    largest sampled sum of proportional set sizes: a shared page is split between the processes
    sharing it, so this is what the server as a whole held at that moment. ``cpu_seconds`` is
    the CPU time the sampler itself spent (reading /proc).
    """

    hwm_sum_kib: int = 0
    rss_peak_kib: int = 0
    pss_peak_kib: int = 0
    max_processes: int = 0
    samples: int = 0
    cpu_seconds: float = 0.0


class MemorySampler:
    """Samples the memory of a set of processes from a background thread, at a fixed interval.

    ``pids`` is called at each sample and returns the server's current processes (for Postfix
    the master and everything below it). Bounded by ``max_seconds``.
    """

    def __init__(
        self, pids: Callable[[], list[int]], interval: float = 0.1, max_seconds: float = 3600.0
    ) -> None:
        self._pids = pids
        self._interval = interval
        self._max_seconds = max_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        self.peaks = MemoryPeaks()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> MemoryPeaks:
        """Stop sampling, take one last sample, and return the peaks."""
        self._stop.set()
        self._thread.join(timeout=10.0)
        self.sample()
        return self.peaks

    def _run(self) -> None:
        deadline = time.monotonic() + self._max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            self.sample()
            self._stop.wait(self._interval)

    def sample(self) -> None:
        began = time.thread_time()
        peaks = self.peaks
        rss = pss = hwm = 0
        pids = self._pids()
        for pid in pids:
            status = _status_kib(pid)
            if not status:
                continue
            rss += status.get("VmRSS", 0)
            hwm += status.get("VmHWM", 0)
            pss += _pss_kib(pid)
        peaks.samples += 1
        peaks.hwm_sum_kib = max(peaks.hwm_sum_kib, hwm)
        peaks.rss_peak_kib = max(peaks.rss_peak_kib, rss)
        peaks.pss_peak_kib = max(peaks.pss_peak_kib, pss)
        peaks.max_processes = max(peaks.max_processes, len(pids))
        peaks.cpu_seconds += time.thread_time() - began

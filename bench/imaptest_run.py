"""Run Dovecot's imaptest (IMAP compliance and stress tester) against a private mailsys.

imaptest is not shipped or built here: point the script at a binary you built yourself
(``--imaptest PATH`` or the ``IMAPTEST`` environment variable; its scripted tests are taken from
``src/tests`` next to it unless ``--tests`` says otherwise). Without a binary the script says so
and exits with status 2. It is not part of ``make test``.

    IMAPTEST=/path/to/imaptest/src/imaptest LD_LIBRARY_PATH=/usr/lib/dovecot \\
        .venv/bin/python bench/imaptest_run.py [--mode scripted|stress|all] [--secs 60]

Each run starts a fresh ``twistd -n mailsys`` in a temporary directory on free loopback ports
(plaintext IMAP, like the Dovecot imaptest is compared with), runs imaptest against the demo
user, prints imaptest's own summary and a count line per run, and stops the server by pid.
"""

from __future__ import annotations

import argparse
import imaplib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.imap_bench import MailsysIMAP
from bench.loopback import LOOPBACK, BenchError, free_port
from bench.processes import install_exit_handlers

USER = "demo@example.test"
PASSWORD = "demo"
# imaptest's default stress mix (which includes EXPUNGE), and the same mix without it.
STRESS_WITH_EXPUNGE = ""
STRESS_WITHOUT_EXPUNGE = "expunge=0"

_SCRIPTED = re.compile(r"^(\d+) test groups: (\d+) failed, (\d+) skipped")
_BASE = re.compile(r"^base protocol: (\d+)/(\d+) individual commands failed")
_EXT = re.compile(r"^extensions: (\d+)/(\d+) individual commands failed")


@dataclass
class RunResult:
    """What one imaptest run reported."""

    name: str
    command: str
    counts: str
    failed: bool


def find_imaptest(given: str | None) -> Path | None:
    """The imaptest binary from --imaptest or $IMAPTEST, if it exists and is executable."""
    candidate = given or os.environ.get("IMAPTEST")
    if not candidate:
        return None
    path = Path(candidate)
    return path if path.is_file() and os.access(path, os.X_OK) else None


def create_mailbox(port: int, name: str) -> None:
    """Create ``name`` for the demo user (imaptest's scripted suite expects it to exist)."""
    client = imaplib.IMAP4(LOOPBACK, port, timeout=30)
    client.login(USER, PASSWORD)
    status, detail = client.create(name)
    client.logout()
    if status != "OK":
        raise BenchError(f"CREATE {name} failed: {detail!r}")


def run_imaptest(binary: Path, args: list[str], timeout: float) -> tuple[int, str]:
    """Run imaptest with ``args``; its combined output and exit status."""
    env = dict(os.environ)
    env.setdefault("LD_LIBRARY_PATH", "/usr/lib/dovecot")
    done = subprocess.run(
        [str(binary), *args], capture_output=True, text=True, errors="replace", env=env,
        timeout=timeout, check=False,
    )
    return done.returncode, done.stdout + done.stderr


def scripted(binary: Path, tests: Path, workdir: Path, verbose: bool) -> RunResult:
    """The scripted suite: every test group under ``tests``."""
    server = _server(workdir / "scripted")
    try:
        create_mailbox(server.imap_port, "imaptest")
        argv = [*_common(server), f"test={tests}"]
        status, output = run_imaptest(binary, argv, timeout=1800)
    finally:
        server.stop()
    if verbose:
        print(output)
    else:
        print("\n".join(line for line in output.splitlines()
                        if line.startswith(("*** Test", " - failed")) or _summary(line)))
    counts = [line for line in output.splitlines() if _summary(line)]
    failed = status != 0 or not counts or any(
        int(m.group(2)) for line in counts if (m := _SCRIPTED.match(line))) or any(
        int(m.group(1)) for line in counts if (m := _BASE.match(line) or _EXT.match(line)))
    return RunResult("scripted", _shown(binary, argv), "; ".join(counts) or "no summary", failed)


_MBOX_FROM = re.compile(rb"(?:\A|(?<=\n\n))(?=From )")
_MESSAGE_ID = re.compile(rb"(?im)^message-id:.*\n(?:[ \t].*\n)*")


def stress_mbox(tests: Path, target: Path) -> Path:
    """The messages APPEND uses in a stress run: every mbox of the scripted suite in one.

    imaptest's stress run knows a message by its Message-ID and reports any difference between
    two messages with the same one as the server changing a message; the suite's mboxes reuse
    Message-IDs (the threading tests), so each message gets a Message-ID of its own here.
    """
    number = 0
    with target.open("wb") as out:
        for source in sorted(tests.glob("*.mbox")):
            data = source.read_bytes()
            for message in _MBOX_FROM.split(data):
                if not message.startswith(b"From "):
                    continue
                number += 1
                from_line, _, rest = message.partition(b"\n")
                rest = _MESSAGE_ID.sub(b"", rest)
                out.write(from_line + b"\nMessage-ID: <%d.stress@imaptest.invalid>\n" % number
                          + rest + (b"" if rest.endswith(b"\n") else b"\n"))
    return target


def stress(binary: Path, workdir: Path, name: str, states: str, secs: int, clients: int,
           mbox: Path, verbose: bool) -> RunResult:
    """A stress run: ``clients`` sessions for ``secs`` seconds over the given command mix."""
    server = _server(workdir / name)
    try:
        argv = [*_common(server), f"mbox={mbox}", f"secs={secs}", f"clients={clients}",
                *states.split()]
        status, output = run_imaptest(binary, argv, timeout=secs + 600)
    finally:
        server.stop()
    errors = [line for line in output.splitlines() if line.startswith(("Error:", "Panic:",
                                                                        "Fatal:"))]
    if verbose:
        print(output)
    else:
        print("\n".join(errors[:50]))
        lines = output.splitlines()
        if "Totals:" in lines:
            # imaptest's last report: commands done per state over the whole run.
            print(f"{name}: " + "\n".join(lines[lines.index("Totals:"):][:5]))
    counts = f"{len(errors)} errors (imaptest exit {status})"
    return RunResult(name, _shown(binary, argv), counts, bool(errors) or status != 0)


def _server(root: Path) -> MailsysIMAP:
    root.mkdir(parents=True)
    server = MailsysIMAP(root, free_port(), free_port())
    server.start()
    return server


def _common(server: MailsysIMAP) -> list[str]:
    return [f"host={LOOPBACK}", f"port={server.imap_port}", f"user={USER}", f"pass={PASSWORD}"]


def _summary(line: str) -> bool:
    return bool(_SCRIPTED.match(line) or _BASE.match(line) or _EXT.match(line))


def _shown(binary: Path, argv: list[str]) -> str:
    return " ".join([str(binary), *argv])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--imaptest", help="the imaptest binary (default: $IMAPTEST)")
    parser.add_argument("--tests", type=Path,
                        help="imaptest's scripted tests (default: tests/ beside the binary)")
    parser.add_argument("--mode", choices=("scripted", "stress", "all"), default="all")
    parser.add_argument("--secs", type=int, default=60, help="length of each stress run")
    parser.add_argument("--clients", type=int, default=10, help="sessions in a stress run")
    parser.add_argument("--mbox", type=Path,
                        help="messages for APPEND in stress runs (default: the suite's mboxes)")
    parser.add_argument("--verbose", action="store_true", help="print imaptest's whole output")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    binary = find_imaptest(args.imaptest)
    if binary is None:
        print("imaptest_run: no imaptest binary: pass --imaptest PATH or set IMAPTEST "
              "(build it from github.com/dovecot/imaptest, branch release-2.3)", file=sys.stderr)
        return 2
    tests = args.tests or binary.parent / "tests"
    if not tests.is_dir() and (args.mode != "stress" or args.mbox is None):
        print(f"imaptest_run: no scripted tests at {tests}: pass --tests DIR", file=sys.stderr)
        return 2
    install_exit_handlers()
    workdir = Path(tempfile.mkdtemp(prefix="imaptest-run-"))
    results: list[RunResult] = []
    try:
        if args.mode in ("scripted", "all"):
            results.append(scripted(binary, tests, workdir, args.verbose))
        if args.mode in ("stress", "all"):
            mbox = args.mbox or stress_mbox(tests, workdir / "stress.mbox")
            results.append(stress(binary, workdir, "stress-with-expunge", STRESS_WITH_EXPUNGE,
                                  args.secs, args.clients, mbox, args.verbose))
            results.append(stress(binary, workdir, "stress-without-expunge",
                                  STRESS_WITHOUT_EXPUNGE, args.secs, args.clients, mbox,
                                  args.verbose))
    except BenchError as exc:
        print(f"imaptest_run: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    for result in results:
        print(f"{result.name}: {result.counts}\n  command: {result.command}")
    return 1 if any(result.failed for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())

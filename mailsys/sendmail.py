"""``mailsys-sendmail``: the sendmail command line programs expect (cron, web applications,
mail(1)), with Postfix's flags, handing mail to the server through the pickup directory.

Meant to be linked as /usr/sbin/sendmail. No password is needed: the server learns the local
user from the owner of the file written (mailsys.pickup.maildrop). Mail given while no server
runs waits in the directory. Every failure is one line on stderr and a sysexits(3) status.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses
from pathlib import Path
from typing import BinaryIO

from mailsys.address import AddressError, parse_mailbox
from mailsys.config import Config, ConfigError, load
from mailsys.pickup.maildrop import DropRequest, DropWriter

PROG = "mailsys-sendmail"
DEFAULT_CONFIG = Path("etc/mailsys.toml")
CONFIG_ENV = "MAILSYS_CONFIG"
SYSTEM_CONFIG = Path("/etc/mailsys/mailsys.toml")

# sysexits(3)
EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_SOFTWARE = 70
EX_OSERR = 71
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78

# Options that take a value, which Postfix accepts and we ignore (body type, DSN notify, return,
# envelope id, delivery mode...).
_IGNORED_WITH_VALUE = frozenset("BNRVLOh")
# Flags Postfix accepts and ignores.
_IGNORED_FLAGS = frozenset("nUmGA")
# The most header bytes read to find -t's recipients before the rest is streamed.
MAX_HEADER = 1024 * 1024
CHUNK = 64 * 1024


class SendmailError(Exception):
    """One line for stderr and the sysexits status to leave with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Options:
    """The parsed command line."""

    mode: str = "deliver"  # "deliver" (-bm), "smtp" (-bs), "queue" (-bp)
    extract: bool = False  # -t
    ignore_dots: bool = False  # -i, -oi
    sender: str | None = None  # -f, -r
    full_name: str | None = None  # -F
    verbose: bool = False  # -v
    config: Path | None = None  # --config, -C
    recipients: list[str] = field(default_factory=list)


def parse_args(argv: list[str]) -> Options:
    """Postfix's sendmail flags; an unknown one raises SendmailError with EX_USAGE."""
    options = Options()
    index = 0

    def value(flag: str, rest: str) -> str:
        nonlocal index
        if rest:
            return rest
        index += 1
        if index >= len(argv):
            raise SendmailError(f"option -{flag} requires an argument", EX_USAGE)
        return argv[index]

    while index < len(argv):
        arg = argv[index]
        if arg == "--":
            index += 1
            break
        if arg.startswith("--config"):
            options.config = Path(value("-config", arg.partition("=")[2]))
            index += 1
            continue
        if not arg.startswith("-") or arg == "-":
            break
        flag, rest = arg[1], arg[2:]
        if flag == "b":
            modes = {"s": "smtp", "p": "queue", "m": "deliver"}
            if rest not in modes:
                raise SendmailError(f"unsupported mode -b{rest} (supported: -bm, -bs, -bp)",
                                    EX_USAGE)
            options.mode = modes[rest]
        elif flag == "o":
            if rest == "i":
                options.ignore_dots = True
            elif not rest:
                value("o", "")  # -o x value: Postfix's way to set a parameter; ignored
            # -oXvalue: other sendmail options, ignored as Postfix does
        elif flag in ("f", "r"):
            options.sender = value(flag, rest)
        elif flag == "F":
            options.full_name = value(flag, rest)
        elif flag == "C":
            options.config = Path(value(flag, rest))
        elif flag in _IGNORED_WITH_VALUE:
            value(flag, rest)
        elif flag in "tivx" or flag in _IGNORED_FLAGS:
            # Grouped single-letter flags, as getopt allows: -ti, -tv
            for letter in arg[1:]:
                if letter == "t":
                    options.extract = True
                elif letter == "i":
                    options.ignore_dots = True
                elif letter == "v":
                    options.verbose = True
                elif letter not in _IGNORED_FLAGS:
                    raise SendmailError(f"unknown option -{letter}", EX_USAGE)
        else:
            raise SendmailError(f"unknown option {arg}", EX_USAGE)
        index += 1
    options.recipients = list(argv[index:])
    return options


def config_path(options: Options, environ: dict[str, str] | None = None) -> Path:
    """--config, else $MAILSYS_CONFIG, else etc/mailsys.toml as `mailsys` does; when that is
    not there either, /etc/mailsys/mailsys.toml: as /usr/sbin/sendmail the command runs in
    whatever directory cron or a web application is in."""
    environ = dict(os.environ) if environ is None else environ
    if options.config is not None:
        return options.config
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV])
    if not DEFAULT_CONFIG.exists() and SYSTEM_CONFIG.exists():
        return SYSTEM_CONFIG
    return DEFAULT_CONFIG


def check_sender(sender: str | None) -> None:
    """-f's address must be an address, a bare login name or <> (the null sender)."""
    if sender is None or sender in ("", "<>"):
        return
    text = sender[1:-1] if sender.startswith("<") and sender.endswith(">") else sender
    if "@" not in text:
        text = f"{text}@localhost"
    try:
        parse_mailbox(text)
    except AddressError:
        raise SendmailError(f"bad sender address: {sender!r}", EX_USAGE) from None


# -- reading the message -----------------------------------------------------------------------


class MessageReader:
    """Standard input as the message: ends at EOF, or at a line of a single "." without -i."""

    def __init__(self, stream: BinaryIO, ignore_dots: bool) -> None:
        self._stream = stream
        self._ignore_dots = ignore_dots
        self._at_line_start = True
        self._done = False

    def read_line(self) -> bytes:
        """The next piece of input (a line, or part of a very long one); b"" at the end."""
        if self._done:
            return b""
        piece = self._stream.readline(CHUNK)
        if not piece:
            self._done = True
            return b""
        if not self._ignore_dots and self._at_line_start and piece in (b".\n", b".\r\n", b"."):
            self._done = True
            return b""
        self._at_line_start = piece.endswith(b"\n")
        return piece


def read_header(reader: MessageReader) -> list[bytes]:
    """The header section's lines (up to and including the empty line, if any)."""
    lines: list[bytes] = []
    size = 0
    while size < MAX_HEADER:
        line = reader.read_line()
        if not line:
            break
        lines.append(line)
        size += len(line)
        if line in (b"\n", b"\r\n"):
            break
    return lines


def extract_recipients(header: list[bytes]) -> tuple[list[str], list[bytes]]:
    """-t: the addresses of To, Cc and Bcc, and the header lines without Bcc (RFC 5322 §3.6.3:
    Bcc addresses get the message, the field itself is removed)."""
    parsed = BytesHeaderParser(policy=compat32).parsebytes(b"".join(header))
    fields: list[str] = []
    for name in ("To", "Cc", "Bcc"):
        fields.extend(str(v) for v in parsed.get_all(name, []))
    addresses = [address for _, address in getaddresses(fields) if address]
    kept: list[bytes] = []
    in_bcc = False
    for line in header:
        if line[:1] in (b" ", b"\t"):  # a folded continuation of the field before
            if not in_bcc:
                kept.append(line)
            continue
        in_bcc = line.split(b":", 1)[0].strip().lower() == b"bcc" and b":" in line
        if not in_bcc:
            kept.append(line)
    return addresses, kept


# -- the modes ---------------------------------------------------------------------------------


def deliver(options: Options, config: Config, stdin: BinaryIO,
            say: Callable[[str], None]) -> int:
    """Write the message into the pickup directory; fail with SendmailError."""
    check_sender(options.sender)
    if not options.recipients and not options.extract:
        raise SendmailError("no recipients given (name them, or use -t)", EX_USAGE)
    reader = MessageReader(stdin, options.ignore_dots)
    header = read_header(reader)
    recipients = list(options.recipients)
    if options.extract:
        found, header = extract_recipients(header)
        recipients += found
        if not recipients:
            raise SendmailError("no recipient addresses found in the message header (-t)",
                                EX_DATAERR)
    sender = options.sender
    if sender == "<>":
        sender = ""
    request = DropRequest(sender=sender, recipients=tuple(recipients),
                          full_name=options.full_name)
    directory = config.pickup.directory
    limit = config.smtp.max_message_size
    try:
        writer = DropWriter(directory, request)
    except OSError as exc:
        raise _write_error(directory, exc) from None
    try:
        for line in header:
            writer.write(line)
        while True:
            piece = reader.read_line()
            if not piece:
                break
            writer.write(piece)
            if writer.size > limit:
                raise SendmailError(f"message too large: more than {limit} bytes "
                                    "(smtp.max_message_size)", EX_DATAERR)
        name = writer.commit()
    except SendmailError:
        writer.abort()
        raise
    except OSError as exc:
        writer.abort()
        raise _write_error(directory, exc) from None
    except BaseException:
        writer.abort()
        raise
    if options.verbose:
        say(f"{PROG}: handed over as {name} ({writer.size} bytes, "
            f"{len(recipients)} recipient(s)) in {directory}")
    return EX_OK


def _write_error(directory: Path, exc: OSError) -> SendmailError:
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return SendmailError(f"cannot write to the pickup directory {directory}: {reason} "
                             "(is this user in its group? see [pickup] group)", EX_NOPERM)
    if exc.errno == errno.ENOENT:
        return SendmailError(f"no pickup directory {directory}: has the server been started "
                             "once with this configuration?", EX_CANTCREAT)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return SendmailError(f"cannot write to {directory}: {reason}", EX_TEMPFAIL)
    return SendmailError(f"cannot write to {directory}: {reason}", EX_IOERR)


def queue_listing(path: Path, config: Config) -> int:
    """-bp: the queue, as ``mailsys queue list`` shows it (the spool is the server's: another
    user is told so)."""
    from mailsys import cli

    spool = config.storage.spool
    if spool.exists() and not os.access(spool, os.R_OK | os.X_OK):
        raise SendmailError(f"cannot read the queue {spool}: permission denied "
                            "(run as the server's user)", EX_NOPERM)
    status = cli.main(["queue", "list", "--config", str(path)])
    return EX_OK if status == 0 else EX_IOERR


def main(argv: list[str] | None = None) -> int:
    """Run the command with ``argv`` (default: sys.argv[1:]); return the sysexits status."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        options = parse_args(argv)
        path = config_path(options)
        try:
            config = load(path, check_files=False)
        except ConfigError as exc:
            raise SendmailError(str(exc), EX_CONFIG) from None
        if options.mode in ("queue", "smtp") and sys.stdout is None:
            # Started with descriptor 1 closed: Python has no stdout at all.
            raise SendmailError("standard output is closed", EX_IOERR)
        if options.mode == "smtp" and sys.stdin is None:
            raise SendmailError("standard input is closed", EX_NOINPUT)
        if options.mode == "queue":
            return queue_listing(path, config)
        if options.mode == "smtp":
            from mailsys.pickup.stdio import serve_stdio

            return serve_stdio(config)
        # Started with descriptor 0 closed: an empty message, as from /dev/null.
        stdin: BinaryIO = sys.stdin.buffer if sys.stdin is not None else io.BytesIO()
        return deliver(options, config, stdin, _say)
    except SendmailError as exc:
        return _fail(str(exc), exc.status)
    except BrokenPipeError:
        return _fail("standard output closed", EX_IOERR)
    except KeyboardInterrupt:
        return _fail("interrupted", EX_TEMPFAIL)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(f"{where}{exc.strerror or exc}", EX_IOERR)
    except Exception as exc:  # a bug: still one line, with enough to report it
        return _fail(f"internal error: {type(exc).__name__}: {exc}", EX_SOFTWARE)


def _say(text: str) -> None:
    print(text, file=sys.stderr)


def _fail(message: str, status: int) -> int:
    # stderr may be closed too: then the status is all that is left.
    with contextlib.suppress(OSError, AttributeError):
        print(f"{PROG}: {message}", file=sys.stderr)
    return status


def run() -> None:  # pragma: no cover - the console script
    """Console script entry: exit with main()'s status, quietly if stdout is closed."""
    status = main()
    if sys.stdout is not None:
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            status = status or EX_IOERR
            # Else Python reports the failed flush of a closed pipe again at exit.
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(status)

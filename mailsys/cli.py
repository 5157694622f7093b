"""The ``mailsys`` command: manage users and check the configuration, without a running server;
manage the queue (``mailsys queue``, mailsys.queue.commands) with or without one.

Every failure is one line on stderr, ``mailsys: <what went wrong>``, never a traceback. Exit
status: 0 success, 1 the operation failed (unknown user, wrong domain, I/O error), 2 the command
line or the configuration is wrong, 141 standard output's reader went away (`| head`), quietly.

The configuration is --config, else $MAILSYS_CONFIG, else etc/mailsys.toml.
"""

from __future__ import annotations

import argparse
import errno
import getpass
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from mailsys.auth.passwords import UnusableHashError, hash_scheme
from mailsys.auth.users import InvalidMailboxError, UserStore, UserStoreError, canonical_mailbox
from mailsys.authn.commands import add_authn_commands
from mailsys.config import LISTENER_KEYS, Config, ConfigError, load
from mailsys.journey.trace import add_trace_command
from mailsys.lab.commands import add_lab_commands
from mailsys.ownership import (
    access_problem,
    check_writer,
    configured_account,
    server_access_problems,
)
from mailsys.queue.commands import add_queue_commands
from mailsys.queue.control import QueueToolError, request_reload

DEFAULT_CONFIG = Path("etc/mailsys.toml")
# The configuration when --config is not given, as for `mailsys-sendmail`.
CONFIG_ENV = "MAILSYS_CONFIG"
_CONFIG_HELP = f"configuration file (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG})"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what `yes | head` reports for yes


class CommandError(Exception):
    """A failure to report as one line, with its exit status."""

    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is the same one line as any other error (plus the usage)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"mailsys: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``mailsys [--config PATH] COMMAND ...``; more commands (queue) go here."""
    parser = _Parser(prog="mailsys", description="Manage a mailsys mail system.")
    # --config is accepted before or after the command; SUPPRESS keeps a later default from
    # overwriting an earlier explicit value.
    config_option = _Parser(add_help=False)
    config_option.add_argument("--config", "-c", type=Path, default=argparse.SUPPRESS,
                               metavar="PATH", help=_CONFIG_HELP)
    # None until main() resolves it: --config, else $MAILSYS_CONFIG, else etc/mailsys.toml.
    parser.add_argument("--config", "-c", type=Path, default=None, metavar="PATH",
                        help=_CONFIG_HELP)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                     parser_class=_Parser)

    user = commands.add_parser("user", help="add, change, delete and list users")
    user_commands = user.add_subparsers(dest="user_command", metavar="ACTION", required=True,
                                        parser_class=_Parser)
    add = user_commands.add_parser("add", parents=[config_option], help="add a user")
    add.add_argument("address", metavar="ADDRESS", help="the mailbox, user@domain")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from the first line of standard input")
    add.add_argument("--admin", action="store_true",
                     help="make the user an administrator of the web page")
    add.set_defaults(run=_user_add)
    passwd = user_commands.add_parser("passwd", parents=[config_option],
                                      help="change a user's password")
    passwd.add_argument("address", metavar="ADDRESS")
    passwd.add_argument("--password-stdin", action="store_true",
                        help="read the password from the first line of standard input")
    passwd.set_defaults(run=_user_passwd)
    delete = user_commands.add_parser("del", parents=[config_option], help="delete a user")
    delete.add_argument("address", metavar="ADDRESS")
    delete.set_defaults(run=_user_del)
    admin = user_commands.add_parser(
        "admin", parents=[config_option],
        help="make a user an administrator of the web page (on) or not (off)")
    admin.add_argument("address", metavar="ADDRESS")
    admin.add_argument("state", choices=("on", "off"), metavar="on|off")
    admin.set_defaults(run=_user_admin)
    listing = user_commands.add_parser("list", parents=[config_option], help="list the users")
    listing.set_defaults(run=_user_list)
    importing = user_commands.add_parser(
        "import", parents=[config_option],
        help="import users and password hashes from a Dovecot passwd-file",
    )
    importing.add_argument("file", metavar="FILE", type=Path,
                           help="lines of user@domain:{SCHEME}hash[:extra fields]")
    importing.add_argument("--replace", action="store_true",
                           help="overwrite the password of users that already exist")
    importing.set_defaults(run=_user_import)

    add_queue_commands(commands, config_option, _Parser)
    add_trace_command(commands, config_option, _Parser)
    add_lab_commands(commands, _Parser)
    add_authn_commands(commands, config_option, _Parser)

    reload = commands.add_parser(
        "reload", parents=[config_option],
        help="make the running server read its configuration again (as SIGHUP does)")
    reload.set_defaults(run=_reload)

    check = commands.add_parser("check-config", parents=[config_option],
                                help="check a configuration file and summarise it")
    check.add_argument("path", metavar="PATH", nargs="?", type=Path,
                       help="the file to check (default: the configuration)")
    check.set_defaults(run=_check_config)
    return parser


def config_path(given: Path | None, environ: dict[str, str] | None = None) -> Path:
    """--config, else $MAILSYS_CONFIG, else etc/mailsys.toml."""
    if given is not None:
        return given
    environ = dict(os.environ) if environ is None else environ
    from_environment = environ.get(CONFIG_ENV)
    return Path(from_environment) if from_environment else DEFAULT_CONFIG


def main(argv: list[str] | None = None) -> int:
    """Run the ``mailsys`` command with ``argv`` (default: sys.argv[1:]); return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    args.config = config_path(args.config)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        status = run(args)
        # Written out now, inside the handlers: a reader that went away (`mailsys ... | head`)
        # would otherwise be reported by the interpreter at exit.
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        return _reader_gone()
    except CommandError as exc:
        return _fail(str(exc), exc.status)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except (UserStoreError, ValueError) as exc:  # ValueError: InvalidMailboxError and the like
        return _fail(str(exc))
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            return _reader_gone()
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(f"{where}{exc.strerror or exc}")
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    except Exception as exc:  # a bug: still one line, as promised, with enough to report it
        return _fail(f"internal error: {type(exc).__name__}: {exc}", 70)  # EX_SOFTWARE


def _reader_gone() -> int:
    """Standard output's reader left (`mailsys queue list | head`): nothing is wrong, so
    nothing is said. What is still buffered for it goes to /dev/null, so that the interpreter's
    own flush at exit cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is no real file (tests): nothing is left to flush
        pass
    return EXIT_BROKEN_PIPE


def _fail(message: str, status: int = EXIT_FAILED) -> int:
    print(f"mailsys: {message}", file=sys.stderr)
    return status


def _store(args: argparse.Namespace, *, changing: bool = True) -> tuple[Config, UserStore]:
    # User management needs the routing and storage sections only: a TLS certificate that this
    # user may not read (or that does not exist yet) is no reason to refuse.
    config = load(args.config, check_files=False)
    account = configured_account(config)
    if changing and account is not None:
        # Before any password prompt: a change the server could not read is refused at once.
        check_writer(config.storage.users, account)
        # The file's own mode is ours to set; the directories above it are the administrator's.
        problem = access_problem(config.storage.users.parent, account, "x")
        if problem is not None:
            print(f"mailsys: warning: the server cannot read {config.storage.users}: {problem}",
                  file=sys.stderr)
    return config, UserStore(config.storage.users, account=account)


def _check_local(config: Config, mailbox: str) -> None:
    problem = _not_local(config, mailbox)
    if problem is not None:
        raise CommandError(problem)


def _not_local(config: Config, mailbox: str) -> str | None:
    """Why ``mailbox`` (canonical) cannot be a user here, or None if its domain is local."""
    domain = mailbox.rpartition("@")[2]
    local_domains = [d.lower().removesuffix(".") for d in config.routing.local_domains]
    if domain in local_domains:
        return None
    aliases = {k.lower().removesuffix("."): v for k, v in config.routing.domain_aliases.items()}
    if domain in aliases:
        return (f"{domain} is an alias domain of {aliases[domain]}; "
                f"add the user in {aliases[domain]} instead")
    known = ", ".join(local_domains) or "none"
    return f"{domain} is not a local domain of {config.path} (routing.local_domains: {known})"


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        password = line.removesuffix("\n").removesuffix("\r")
        if not password:
            raise CommandError("no password on standard input")
        return password
    try:
        password = getpass.getpass("Password: ")
        again = getpass.getpass("Password (again): ")
    except EOFError:
        raise CommandError("no password given") from None
    if password != again:
        raise CommandError("the passwords do not match")
    if not password:
        raise CommandError("the password is empty")
    return password


def _user_add(args: argparse.Namespace) -> int:
    config, store = _store(args)
    mailbox = canonical_mailbox(args.address)
    _check_local(config, mailbox)
    if store.exists(mailbox):  # ask before the password prompt; add() checks again under lock
        raise CommandError(f"{mailbox} already exists")
    store.add(mailbox, _read_password(args.password_stdin), admin=args.admin)
    print(f"added {mailbox}{' (administrator)' if args.admin else ''}")
    return EXIT_OK


def _user_admin(args: argparse.Namespace) -> int:
    _, store = _store(args)
    mailbox = store.set_admin(args.address, args.state == "on")
    print(f"{mailbox} is {'now' if args.state == 'on' else 'no longer'} an administrator")
    return EXIT_OK


def _user_passwd(args: argparse.Namespace) -> int:
    _, store = _store(args)
    mailbox = canonical_mailbox(args.address)
    if not store.exists(mailbox):
        raise CommandError(f"no such user: {mailbox}")
    store.set_password(mailbox, _read_password(args.password_stdin))
    print(f"changed the password of {mailbox}")
    return EXIT_OK


def _user_del(args: argparse.Namespace) -> int:
    _, store = _store(args)
    mailbox = store.delete(args.address)
    # The Maildir is left alone on purpose: deleting mail is a separate, deliberate act.
    print(f"deleted {mailbox} (its Maildir is kept)")
    return EXIT_OK


def _user_list(args: argparse.Namespace) -> int:
    _, store = _store(args, changing=False)
    for mailbox in store.list():
        print(mailbox)
    return EXIT_OK


def _user_import(args: argparse.Namespace) -> int:
    """Import a Dovecot passwd-file: every usable line, refusing the others line by line."""
    config, store = _store(args)
    path: Path = args.file
    text = path.read_bytes().decode("utf-8", "surrogateescape")
    users: list[tuple[str, str, str | None]] = []
    seen: dict[str, int] = {}
    refused = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            entry = _import_line(config, line)
            first = seen.setdefault(entry[0], number)
            if first != number:
                raise CommandError(f"{entry[0]} again (first on line {first})")
        except (CommandError, InvalidMailboxError, UnusableHashError) as exc:
            print(f"mailsys: {path} line {number}: {exc}; not imported", file=sys.stderr)
            refused += 1
            continue
        users.append(entry)
    result = store.import_hashed(users, replace=args.replace)
    summary = (f"imported from {path}: {_plural(len(result.added), 'user')} added, "
               f"{len(result.replaced)} replaced")
    if result.skipped:
        summary += f", {len(result.skipped)} already present and kept (--replace overwrites)"
    if refused:
        summary += f", {_plural(refused, 'line')} refused"
    print(summary)
    return EXIT_FAILED if refused else EXIT_OK


def _import_line(config: Config, line: str) -> tuple[str, str, str | None]:
    """(mailbox, {SCHEME}hash, extra fields) of one passwd-file line; raises why not usable."""
    name, colon, rest = line.partition(":")
    if not colon:
        raise CommandError("expected user@domain:{SCHEME}hash")
    mailbox = canonical_mailbox(name.strip())
    problem = _not_local(config, mailbox)
    if problem is not None:
        raise CommandError(problem)
    hashed, colon, extra = rest.partition(":")
    if not hashed:
        raise CommandError(f"{mailbox} has no password hash")
    hash_scheme(hashed)  # refuses what the server could not check
    return mailbox, hashed, extra if colon else None


def _reload(args: argparse.Namespace) -> int:
    """Ask the server running on the configuration's spool to reload, through its control
    socket (mailsys.queue.control), and print its answer: reloaded, or why not."""
    config = load(args.config, check_files=False)
    try:
        outcome = request_reload(config.storage.spool, account=configured_account(config))
    except QueueToolError as exc:
        raise CommandError(str(exc)) from None
    if not outcome.ok:
        raise CommandError(outcome.message)
    print(outcome.message)
    return EXIT_OK


def _check_config(args: argparse.Namespace) -> int:
    path: Path = args.path if args.path is not None else args.config
    config = load(path, check_files=True)
    account = configured_account(config)
    listeners = sum(len(getattr(getattr(config, section), attr))
                    for section, attr in LISTENER_KEYS)
    domains = len(config.routing.local_domains)
    problems = server_access_problems(config, account) if account is not None else []
    for problem in problems:
        print(f"mailsys: {path}: {problem}", file=sys.stderr)
    if problems:
        return EXIT_FAILED
    runs_as = f", runs as {account}" if account is not None else ""
    print(f"{path}: ok ({_plural(listeners, 'listener')}, {_plural(domains, 'local domain')}"
          f"{runs_as})")
    return EXIT_OK


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


if __name__ == "__main__":  # pragma: no cover - python -m mailsys.cli
    sys.exit(main())

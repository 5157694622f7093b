"""The twistd plugin's options and service maker: ``twistd -n mailsys --config PATH``."""

from __future__ import annotations

import os
import sys

from twisted.application.service import MultiService, Service
from twisted.logger import Logger
from twisted.python import usage
from typing_extensions import override

from mailsys import config as config_module
from mailsys import logwriter
from mailsys.ownership import OwnershipError, ServerAccount, configured_account, resolve_account

log = Logger()

DEFAULT_CONFIG = "etc/mailsys.toml"


class Options(usage.Options):
    """Command line of ``twistd mailsys``."""

    synopsis = "[--config PATH] [--log-format text|json]"
    longdesc = "Run the mailsys mail system (SMTP, submission, queue, delivery)."
    optParameters = [  # noqa: N815 - usage.Options' name
        ["config", "c", DEFAULT_CONFIG, "Path to the TOML configuration file."],
        ["log-format", None, logwriter.TEXT,
         "text (twistd's lines) or json (one JSON object per line, for log shippers)."],
    ]

    def postOptions(self) -> None:  # noqa: N802 - usage.Options hook
        parent = getattr(self, "parent", None)  # twistd's ServerOptions, when run by twistd
        if self["log-format"] not in logwriter.LOG_FORMATS:
            print(f"mailsys: --log-format: {self['log-format']!r} is not one of "
                  f"{', '.join(logwriter.LOG_FORMATS)}", file=sys.stderr)
            raise SystemExit(2)
        if parent is not None:
            logwriter.use_for_twistd(parent, self["log-format"])
        try:
            self["loaded"] = config_module.load(self["config"])
            self["account"] = _server_account(self["loaded"], parent)
        except (config_module.ConfigError, OwnershipError) as exc:
            # One line and exit status 2, like `mailsys check-config`; no usage dump.
            print(f"mailsys: {exc}", file=sys.stderr)
            raise SystemExit(2) from None


def _server_account(config: config_module.Config,
                    twistd: usage.Options | None) -> ServerAccount | None:
    """The account the server will run as: ``[server] user``/``group``, or twistd's --uid/--gid.

    When both are given they must name the same account: the ``mailsys`` commands know only the
    config, and would give their files to another account than the server's.
    """
    account = configured_account(config)
    uid = twistd.get("uid") if twistd is not None else None
    if uid is None:
        return account
    gid = twistd.get("gid") if twistd is not None else None
    dropped = resolve_account(uid, gid)
    assert dropped is not None
    if account is not None and (account.uid, account.gid) != (dropped.uid, dropped.gid):
        raise OwnershipError(f"twistd runs the server as {dropped} (--uid/--gid) but "
                             f"{config.path} says [server] user/group {account}; make them the "
                             "same")
    return account or dropped


def makeService(options: Options) -> MultiService:  # noqa: N802 - the name twistd calls
    """Build the service; start-up problems become one line on stderr and exit status 2."""
    from twisted.internet import reactor

    from mailsys.service import build_service
    from mailsys.tls import TLSConfigurationError

    _warn_if_root(options)
    try:
        mail = build_service(options["loaded"], reactor, account=options.get("account"))
    except (TLSConfigurationError, OSError, ValueError) as exc:
        print(f"mailsys: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    top = _ExitOnStartupError()
    Service.setServiceParent(mail, top)
    return top


def _warn_if_root(options: Options) -> None:
    """One warning line when the server would keep running as root: twistd drops privileges
    after binding the ports only when given --uid (and --gid)."""
    parent = getattr(options, "parent", None)
    if os.geteuid() != 0 or (parent is not None and parent.get("uid") is not None):
        return
    account: ServerAccount | None = options.get("account")
    example = f"--uid={account.user} --gid={account.group}" if account else "--uid=mail --gid=mail"
    log.warn("running as root: give twistd --uid (and --gid) to serve as an unprivileged "
             "account, e.g. twistd {example} mailsys", example=example)


class _ExitOnStartupError(MultiService):
    """twistd's top service: a start-up failure (a port that cannot be bound) becomes one line on
    stderr and exit status 2 instead of a traceback or a server that runs without its port."""

    def __init__(self) -> None:
        # Base classes by name, not super(): see MailService.__init__.
        MultiService.__init__(self)

    @override
    def privilegedStartService(self) -> None:
        from mailsys.service import StartupError

        try:
            MultiService.privilegedStartService(self)
        except StartupError as exc:
            print(f"mailsys: {exc}", file=sys.stderr)
            raise SystemExit(2) from None

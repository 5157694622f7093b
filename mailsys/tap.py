"""The twistd plugin's options and service maker: ``twistd -n mailsys --config PATH``."""

from __future__ import annotations

import sys

from twisted.application.service import MultiService, Service
from twisted.python import usage
from typing_extensions import override

from mailsys import config as config_module
from mailsys import logwriter

DEFAULT_CONFIG = "etc/mailsys.toml"


class Options(usage.Options):
    """Command line of ``twistd mailsys``."""

    synopsis = "[--config PATH]"
    longdesc = "Run the mailsys mail system (SMTP, submission, queue, delivery)."
    optParameters = [  # noqa: N815 - usage.Options' name
        ["config", "c", DEFAULT_CONFIG, "Path to the TOML configuration file."],
    ]

    def postOptions(self) -> None:  # noqa: N802 - usage.Options hook
        parent = getattr(self, "parent", None)  # twistd's ServerOptions, when run by twistd
        if parent is not None:
            logwriter.use_for_twistd(parent)
        try:
            self["loaded"] = config_module.load(self["config"])
        except config_module.ConfigError as exc:
            # One line and exit status 2, like `mailsys check-config`; no usage dump.
            print(f"mailsys: {exc}", file=sys.stderr)
            raise SystemExit(2) from None


def makeService(options: Options) -> MultiService:  # noqa: N802 - the name twistd calls
    """Build the service; start-up problems become one line on stderr and exit status 2."""
    from twisted.internet import reactor

    from mailsys.service import build_service
    from mailsys.tls import TLSConfigurationError

    try:
        mail = build_service(options["loaded"], reactor)
    except (TLSConfigurationError, OSError, ValueError) as exc:
        print(f"mailsys: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    top = _ExitOnStartupError()
    Service.setServiceParent(mail, top)
    return top


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

"""twistd plugin: ``twistd -n mailsys --config etc/mailsys.toml``."""

from twisted.application.service import ServiceMaker

mailsys = ServiceMaker(
    "mailsys",
    "mailsys.tap",
    "A complete mail system: SMTP, submission, durable queue, Maildir delivery.",
    "mailsys",
)

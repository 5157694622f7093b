"""SMTP replies, named: a code, an enhanced status code (RFC 3463) and text safe to show a peer.

No reply string is typed anywhere else; protocol code refers to these names.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: basic code, enhanced code and a plain, client-safe text."""

    code: int
    enhanced: str
    text: str

    def with_text(self, text: str) -> Reply:
        """The same codes with another text (e.g. naming the queue id)."""
        return Reply(self.code, self.enhanced, text)

    def lines(self) -> list[bytes]:
        """The reply as wire lines, without CRLF; multi-line text uses the 'code-' form."""
        parts = self.text.split("\n") or [""]
        out = []
        for index, part in enumerate(parts):
            sep = " " if index == len(parts) - 1 else "-"
            prefix = f"{self.code}{sep}"
            if self.enhanced:
                prefix += self.enhanced + " "
            out.append((prefix + part).encode("utf-8", "replace"))
        return out

    @property
    def is_success(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def __str__(self) -> str:
        """One line for logs, attempts and DSN texts: "451 4.4.1 No connection"."""
        return " ".join(part for part in (str(self.code), self.enhanced, self.text) if part)


# 2xx
OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Sender ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient ok")
RESET_OK = Reply(250, "2.0.0", "Reset ok")
QUEUED = Reply(250, "2.0.0", "Ok: queued")
CHUNK_OK = Reply(250, "2.0.0", "Chunk accepted")
VRFY_CANNOT = Reply(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = Reply(
    214, "2.0.0",
    "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS AUTH",
)
BYE = Reply(221, "2.0.0", "Bye")
READY_TLS = Reply(220, "2.0.0", "Ready to start TLS")
START_INPUT = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")

# 4xx
SERVICE_UNAVAILABLE = Reply(421, "4.3.2", "Service not available, closing channel")
IDLE_TIMEOUT = Reply(421, "4.4.2", "Idle timeout, closing connection")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_FROM_CLIENT = Reply(
    421, "4.7.0", "Too many connections from your address, try again later"
)
TOO_MANY_AUTH_FAILURES = Reply(421, "4.7.0", "Too many authentication failures, closing connection")
SPOOL_FAILED = Reply(451, "4.3.0", "Temporary failure storing the message, try again later")
LOOKUP_FAILED = Reply(451, "4.3.0", "Temporary lookup failure, try again later")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available")
# Storage (RFC 3463 §3.3 X.3.1 mail system full, §3.2 X.2.2 mailbox full; RFC 5321 §4.2.2 452
# "insufficient system storage"; RFC 1870 §6.1 for a declared SIZE that does not fit now).
SYSTEM_FULL = Reply(452, "4.3.1", "Insufficient system storage, try again later")
MAILBOX_FULL = Reply(452, "4.2.2", "Mailbox full, try again later")
# What the queue records for a local copy that could not be written for lack of space.
DELIVERY_SYSTEM_FULL = Reply(452, "4.3.1", "Mail system full, will retry")
DELIVERY_MAILBOX_FULL = Reply(452, "4.2.2", "Mailbox full, will retry")
# A recipient still over quota when its message expires (RFC 3463 X.2.2, permanent form).
MAILBOX_FULL_EXPIRED = Reply(552, "5.2.2", "Mailbox full: delivery time expired")

# 5xx: syntax and sequence
COMMAND_UNRECOGNIZED = Reply(500, "5.5.2", "Command not recognized")
LINE_TOO_LONG = Reply(500, "5.5.0", "Line too long")
SYNTAX_ERROR = Reply(501, "5.5.2", "Syntax error in parameters or arguments")
BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")
BAD_PARAMETER = Reply(555, "5.5.4", "Unsupported or malformed parameter")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
NEED_EHLO = Reply(503, "5.5.1", "Send EHLO or HELO first")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command first")
NEED_RCPT = Reply(503, "5.5.1", "Need RCPT command first")
NESTED_MAIL = Reply(503, "5.5.1", "Sender already specified")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
BARE_LINE_ENDING = Reply(
    550, "5.6.11", "Bare CR or LF not allowed; lines must end with CRLF (RFC 5321 2.3.8)"
)
DATA_LINE_TOO_LONG = Reply(
    550, "5.6.0", "Message refused: a line exceeds the maximum length (RFC 5321 4.5.3.1.6)"
)
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
LOOP_DETECTED = Reply(554, "5.4.6", "Too many Received headers: mail loop detected")
SMTPUTF8_REQUIRED = Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
EIGHTBIT_NOT_DECLARED = Reply(554, "5.6.1", "8-bit data sent in a 7BIT message")
TLS_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")

# 5xx: policy
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
MAILBOX_UNKNOWN = Reply(550, "5.1.1", "No such user here")
SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address not owned by authenticated user")
AUTH_INVALID = Reply(535, "5.7.8", "Authentication credentials invalid")

# Added for the ESMTP server engine (mailsys.smtp.server, mailsys.address).
# The greeting and the HELO/EHLO replies carry no enhanced code (RFC 2034 §3); the server puts
# its host name in front of GREETING's text.
GREETING = Reply(220, "", "ESMTP mailsys")
INTERNAL_ERROR = Reply(451, "4.3.0", "Internal error")
INTERNAL_ERROR_CLOSING = Reply(421, "4.3.0", "Internal error, closing connection")
BARE_LINE_ENDING_COMMAND = Reply(
    500, "5.5.2", "Bare CR or LF not allowed in commands; end lines with CRLF (RFC 5321 2.3.8)"
)
BAD_PARAMETER_VALUE = Reply(501, "5.5.4", "Invalid parameter value")
DUPLICATE_PARAMETER = Reply(555, "5.5.4", "Duplicate parameter")
SENDER_TOO_LONG = Reply(501, "5.1.7", "Sender address too long")
RECIPIENT_TOO_LONG = Reply(501, "5.1.3", "Recipient address too long")
TLS_ALREADY_ACTIVE = Reply(503, "5.5.1", "TLS already active")
CHUNK_AFTER_FAILURE = Reply(503, "5.5.1", "A previous BDAT failed; send RSET or MAIL")

# Added for SMTP AUTH (RFC 4954) and submission (RFC 6409). A 334 carries no enhanced code, only
# the base64 challenge (RFC 4954 §4); PLAIN's is empty, LOGIN's are "Username:" and "Password:".
AUTH_CONTINUE = Reply(334, "", "")
LOGIN_USERNAME = Reply(334, "", "VXNlcm5hbWU6")
LOGIN_PASSWORD = Reply(334, "", "UGFzc3dvcmQ6")
AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")  # RFC 4954 §4: "*"
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode the response: not base64")  # RFC 4954 §6
AUTH_NO_MECHANISM = Reply(501, "5.5.4", "AUTH needs a mechanism: PLAIN or LOGIN")
AUTH_UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication mechanism")
AUTH_NEEDS_EHLO = Reply(503, "5.5.1", "Send EHLO first")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Already authenticated")  # RFC 4954 §4
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "AUTH is not allowed during a mail transaction")
AUTH_TEMPORARY_FAILURE = Reply(454, "4.7.0", "Temporary authentication failure")  # RFC 4954 §6

# The teaching lab's faults (mailsys.lab.faults): a lab server says plainly that it was told to.
LAB_TEMPFAIL = Reply(451, "4.3.2", "Lab fault: this server refuses mail for now, try again later")
LAB_REJECT = Reply(550, "5.7.1", "Lab fault: this server refuses all mail")
LAB_GREYLISTED = Reply(451, "4.7.1", "Greylisted: first attempt from this sender, try again later")


def lab_chosen(code: int) -> Reply:
    """The reply a lab ``fail-NNN@`` recipient asks for (RFC 3463: the class follows the code)."""
    cls = code // 100
    enhanced = f"{cls}.0.0" if cls in (2, 4, 5) else ""
    return Reply(code, enhanced, f"Lab: the reply fail-{code} asks for")


# Intake defences (mailsys.defence): past a rate limit 421 4.7.0 (closing) or 450 4.7.1 (try
# this again later), a policy refusal 554/550 5.7.1 (RFC 3463 §3.8 X.7.1: delivery not
# authorized). Texts name the reason, never the internals.
SHED_IDLE = Reply(421, "4.7.0", "Server busy, closing idle connection; try again later")
RATE_CONNECTIONS = Reply(
    421, "4.7.0", "Too many connections from your network, try again later")
RATE_MESSAGES = Reply(450, "4.7.1", "Too many messages from your network, try again later")
RATE_RECIPIENTS = Reply(450, "4.7.1", "Too many recipients from your network, try again later")
RATE_UNKNOWN_RECIPIENTS = Reply(
    421, "4.7.0", "Too many unknown recipients from your network, closing connection")
RATE_USER_MESSAGES = Reply(450, "4.7.1", "Sending rate limit reached, try again later")
RATE_USER_RECIPIENTS = Reply(450, "4.7.1", "Recipient rate limit reached, try again later")
PREGREET = Reply(554, "5.5.1", "Protocol error: talked before the greeting")
CLIENT_LISTED = Reply(554, "5.7.1", "Service unavailable; client blocked using a DNS list")
CLIENT_BLOCKED = Reply(554, "5.7.1", "Access denied: client network blocked")
SENDER_BLOCKED = Reply(554, "5.7.1", "Sender address rejected: access denied")
HELO_REJECTED = Reply(550, "5.7.1", "HELO rejected")
NO_REVERSE_DNS = Reply(550, "5.7.1", "Client host has no forward-confirmed reverse DNS name")
GREYLISTED = Reply(450, "4.7.1", "Greylisted, please try again later")
SPAM_REJECTED = Reply(554, "5.7.1", "Message rejected as spam")
SPAM_DEFERRED = Reply(451, "4.7.1", "Message deferred by the content filter, try again later")
FILTER_UNAVAILABLE = Reply(451, "4.7.1", "Content filter unavailable, try again later")

"""POP3 retrieval (RFC 1939 with CAPA, STLS and SASL PLAIN): the server engine in ``server``,
the listeners of a Config in ``wiring``."""

from mailsys.pop3.wiring import pop3_factories

__all__ = ["pop3_factories"]

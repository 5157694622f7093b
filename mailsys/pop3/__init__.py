"""POP3 retrieval (RFC 1939 with CAPA, STLS and SASL PLAIN): the server engine in ``server``;
its listeners are wired by mailsys.retrieval, as IMAP's are."""

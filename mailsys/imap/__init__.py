"""IMAP4rev1 (RFC 3501) and the extensions clients rely on, over the mailbox store.

- ``parser``: command framing (lines, literals, limits) and the argument reader.
- ``session``: the protocol state machine, login, SELECT and IDLE (its listeners are wired by
  mailsys.retrieval, as POP3's are); ``context``: what the command groups share with it;
  ``mailboxes``, ``messages``, ``transfers``, ``quota``: the command groups.
- ``fetch``, ``search``: FETCH attributes and SEARCH keys; ``bodystructure``: MIME structure,
  ENVELOPE, BODYSTRUCTURE and sections; ``responses``: quoting, literals and every named
  answer; ``names``: modified UTF-7 and LIST patterns; ``flags``: IMAP flags and Maildir letters.
"""

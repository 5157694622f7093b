"""Delivery agents: the Maildir writer for local mailboxes and the relay to other servers."""

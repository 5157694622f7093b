"""Delivery agents: the Maildir writer for local mailboxes (relay to other servers comes later)."""

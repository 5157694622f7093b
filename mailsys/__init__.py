"""mailsys: a complete mail system on Twisted."""

__version__ = "0.1.0"

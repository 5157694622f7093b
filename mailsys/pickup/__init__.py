"""Local submission without a password: ``mailsys-sendmail`` writes drop files into the pickup
directory, and the running server queues them (maildrop holds the format, watcher the server)."""

"""The teaching lab (`mailsys lab`): a small internet on one machine, started without root.

A lab DNS zone (zone.py), a certificate authority that issues every host's certificate (ca.py),
one mail system per domain on its own loopback address (plan.py, configs.py) and the commands
that start, report and stop them (control.py, commands.py).
"""

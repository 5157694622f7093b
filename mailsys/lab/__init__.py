"""The teaching lab (`mailsys lab`): a small internet on one machine, started without root.

A lab DNS zone with each domain's DKIM key (zone.py), a certificate authority that issues every
host's certificate (ca.py), one mail system per domain on its own loopback address (plan.py,
configs.py), the commands that start, report, break and stop them and hurry their queues'
clock (control.py, commands.py), and the scenarios a class runs (scenarios.py). Inside a lab
server: the fault policy and the hurried clock (faults.py, clock.py, serving.py).
"""

"""Side-by-side benchmarks of mailsys against peer mail servers, on loopback only.

Not part of the test suite. Each script here starts its own private servers in temporary
directories, drives them with an external load generator and stops them by process id.
"""

"""Mail authentication: SPF (RFC 7208), DKIM verification and signing (RFC 6376, RFC 8463),
DMARC (RFC 9989), iprev, and the Authentication-Results header (RFC 8601).

Every check asks DNS through mailsys.dns.CachingResolver and keeps its evidence (the answers it
used, the term that matched, the signature's d= and s=, the DMARC record), so a result can be
explained. Bad input gives a result (permerror, temperror, fail), never an exception.
"""

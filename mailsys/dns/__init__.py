"""DNS done once: the caching resolver every room asks (relay MX lookups, mail authentication,
intake defences), on twisted.names, honouring TTLs and negative answers.

The lab and test zones are served by mailsys.labdns.
"""

from mailsys.dns.cache import (
    TLSA,
    Answer,
    CachingResolver,
    DNSTemporaryError,
    TLSARecord,
    ip_address,
    reverse_name,
)

__all__ = [
    "TLSA",
    "Answer",
    "CachingResolver",
    "DNSTemporaryError",
    "TLSARecord",
    "ip_address",
    "reverse_name",
]

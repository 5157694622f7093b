"""The HTTP surface on twisted.web: health checks, Prometheus metrics, client autoconfiguration
and the MTA-STS policy file (the journey and queue pages will join them here).

It reads what the other rooms expose (the metrics object, readiness checks, the config) and
never reaches into sessions.
"""

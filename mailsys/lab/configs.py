"""One mailsys configuration per lab domain: its listeners on the host's own address, its
certificate from the lab CA, relay through the lab DNS with verified TLS, leaving from its own
address (relay.bind_address), mail authentication checked against the lab DNS and signed with
the domain's DKIM key, the journey recorded, the lab's fault file and hurried clock, and its two
users.
"""

from __future__ import annotations

import json
from pathlib import Path

from mailsys.auth.users import UserStore
from mailsys.lab.ca import HostFiles
from mailsys.lab.plan import LabHost, LabPlan

# Teaching wants retries seen in minutes, not hours; the hurried clock is for the rest.
RETRY_SCHEDULE = (30.0, 60.0, 120.0, 300.0, 600.0)
# The delay notice after 30 minutes and the bounce after a day of queue time: `lab clock
# advance 1h` shows the first, `lab clock advance 1d` the second.
DELAY_WARNING = 1800.0
MAX_LIFETIME = 86400.0


def _endpoint(port: int, address: str) -> str:
    return f"tcp:{port}:interface={address}"


def render_config(plan: LabPlan, host: LabHost, tls: HostFiles) -> str:
    """The TOML configuration of ``host``'s mail system."""
    ports, address, d = plan.ports, host.address, host.directory

    def listen(*numbers: int) -> str:
        return json.dumps([_endpoint(port, address) for port in numbers])

    retry = ", ".join(f"{delay:g}" for delay in RETRY_SCHEDULE)
    return f"""# The {host.domain} mail system of the lab in {plan.directory};
# `mailsys lab up` writes this file each time it starts the lab.

[server]
hostname = "{host.hostname}"

[storage]
spool = "{d / 'spool'}"
maildirs = "{d / 'maildirs'}"
users = "{d / 'users'}"

[tls]
certificate = "{tls.certificate}"
key = "{tls.key}"

[smtp]
# Port 25's role (mail between MX hosts), on an unprivileged port: no root needed.
listen = {listen(ports.smtp)}

[submission]
listen = {listen(ports.submission)}
listen_tls = {listen(ports.submissions)}

[imap]
listen = {listen(ports.imap)}
listen_tls = {listen(ports.imaps)}

[pop3]
listen = {listen(ports.pop3)}
listen_tls = {listen(ports.pop3s)}

[web]
# HTTP: the journey page (log in with a lab address), /livez, /readyz and /metrics.
listen = {listen(ports.web)}

[routing]
local_domains = ["{host.domain}"]

[relay]
# Every lookup goes to the lab DNS; MX hosts listen on the lab's port 25 stand-in.
dns_servers = ["{plan.dns_address}:{ports.dns}"]
port = {ports.smtp}
tls_policy = "verify"
tls_ca_file = "{plan.ca_file}"
# Leave from this host's own address, so SPF, iprev and Received lines tell the truth.
bind_address = "{address}"
ip_version = "ipv4"
retry_schedule = [{retry}]
delay_warning = {DELAY_WARNING:g}
max_lifetime = {MAX_LIFETIME:g}
connect_timeout = 10

[authn]
# SPF, DKIM, DMARC and iprev for real, against the lab DNS (the relay's dns_servers); the
# domain's DKIM key, published in the lab zone, signs what its users submit.
checks = true
key_dir = "{host.dkim_directory}"
dns_timeout = 5

[journey]
# Every step of every message, for `mailsys trace` and the lab's scenarios.
enabled = true
path = "{d / 'journey.sqlite'}"

[lab]
# Faults from `mailsys lab fault {host.domain} ...`, and the queue clock `mailsys lab clock` moves.
faults = "{host.fault_path}"
clock = "{plan.clock_path}"
"""


def write_config(plan: LabPlan, host: LabHost, tls: HostFiles) -> Path:
    host.directory.mkdir(parents=True, exist_ok=True)
    host.config_path.write_text(render_config(plan, host, tls))
    return host.config_path


def ensure_users(host: LabHost) -> None:
    """Add the host's users with their known passwords; users already there keep theirs."""
    store = UserStore(host.directory / "users")
    for user in host.users:
        if not store.exists(user.address):
            store.add(user.address, user.password)

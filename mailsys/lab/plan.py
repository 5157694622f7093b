"""The layout of a lab: its domains, each host's name and loopback address, the ports every host
listens on, the users and their passwords, and where each file lives under the lab directory.

A plan is computed from three inputs (directory, number of domains, network) and nothing else,
so `lab up`, `lab status` and `lab down` agree on it without asking each other.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DIRECTORY = Path("var/lab")
DEFAULT_DOMAINS = 3
DEFAULT_NETWORK = "127.0.2.0/24"
LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")

DOMAIN_LABELS = (
    "alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa",
    "lambda", "mu", "nu", "xi", "omicron", "pi", "rho", "sigma", "tau", "upsilon", "phi", "chi",
    "psi", "omega",
)
USER_NAMES = ("alice", "bob")


class LabError(Exception):
    """A lab command cannot go on; the text is one line for the person at the keyboard."""


@dataclass(frozen=True)
class Ports:
    """The ports of every lab host: each host has its own address, so all share the numbers.

    Port 25's role (MX to MX) is played by ``smtp``, unprivileged so no root is needed; the
    others keep the well-known port's last digits where they can, to be recognised.
    """

    smtp: int = 2525
    submission: int = 5587
    submissions: int = 5465
    imap: int = 5143
    imaps: int = 5993
    pop3: int = 5110
    pop3s: int = 5995
    web: int = 5080
    dns: int = 5053

    def mail(self) -> dict[str, int]:
        """Every listener of a lab server by name, in the order the table shows them."""
        return {"smtp": self.smtp, "submission": self.submission,
                "submissions": self.submissions, "imap": self.imap, "imaps": self.imaps,
                "pop3": self.pop3, "pop3s": self.pop3s, "web": self.web}


@dataclass(frozen=True)
class LabUser:
    address: str
    password: str


@dataclass(frozen=True)
class LabHost:
    """One lab domain and the mail system that serves it."""

    domain: str
    hostname: str
    address: str
    directory: Path
    users: tuple[LabUser, ...]

    @property
    def config_path(self) -> Path:
        return self.directory / "mailsys.toml"

    @property
    def log_path(self) -> Path:
        return self.directory / "twistd.log"

    @property
    def fault_path(self) -> Path:
        return self.directory / "fault.json"

    @property
    def dkim_directory(self) -> Path:
        return self.directory / "dkim"

    @property
    def journey_path(self) -> Path:
        return self.directory / "journey.sqlite"

    def inbox(self, address: str) -> Path:
        """The new/ directory of a user's Maildir."""
        user, _, domain = address.partition("@")
        return self.directory / "maildirs" / domain / user / "new"


@dataclass(frozen=True)
class LabPlan:
    """The whole lab: DNS server address, hosts, ports and files."""

    directory: Path
    network: ipaddress.IPv4Network
    dns_address: str
    hosts: tuple[LabHost, ...]
    ports: Ports

    @property
    def state_path(self) -> Path:
        return self.directory / "lab.json"

    @property
    def zone_path(self) -> Path:
        return self.directory / "dns" / "zone.json"

    @property
    def dns_log_path(self) -> Path:
        return self.directory / "dns" / "dns.log"

    @property
    def clock_path(self) -> Path:
        return self.directory / "clock.json"

    @property
    def fallback(self) -> LabHost | None:
        """The domain with two MX hosts, for the mx-fallback lesson: the last of three or more.
        Its first MX (``mx1.DOMAIN``, preference 10) is at ``dead_address``, where nothing ever
        listens; its own server is the second (preference 20)."""
        return self.hosts[-1] if len(self.hosts) >= 3 else None

    @property
    def dead_address(self) -> str:
        """The lab network's last address: never given to a host, so nothing listens there."""
        return str(self.network.broadcast_address - 1)

    @property
    def ca_directory(self) -> Path:
        return self.directory / "ca"

    @property
    def ca_file(self) -> Path:
        return self.ca_directory / "ca.pem"

    def host(self, domain: str) -> LabHost:
        for host in self.hosts:
            if host.domain == domain:
                return host
        raise LabError(f"no lab domain {domain!r} (the lab has "
                       f"{', '.join(h.domain for h in self.hosts)})")


def parse_network(text: str) -> ipaddress.IPv4Network:
    """The ``--net`` value: an IPv4 network inside 127.0.0.0/8, where any address can be bound
    without root (on Linux the whole block is the loopback interface's)."""
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise LabError(f"--net {text!r} is not a network such as {DEFAULT_NETWORK}") from None
    if not isinstance(network, ipaddress.IPv4Network) or not network.subnet_of(LOOPBACK):
        raise LabError(f"--net {text!r} must be inside 127.0.0.0/8 (loopback)")
    return network


def make_plan(directory: Path, domains: int = DEFAULT_DOMAINS,
              network: str = DEFAULT_NETWORK, ports: Ports | None = None) -> LabPlan:
    """The plan of a lab of ``domains`` domains in ``directory`` on ``network``."""
    if not 1 <= domains <= len(DOMAIN_LABELS):
        raise LabError(f"--domains must be 1-{len(DOMAIN_LABELS)}, got {domains}")
    net = parse_network(network)
    addresses = [str(a) for a in net.hosts()]
    if len(addresses) < domains + 2:
        raise LabError(f"--net {network} has {len(addresses)} addresses; the lab needs "
                       f"{domains + 2} (one for DNS, one per domain, one switched-off MX)")
    directory = Path(directory).absolute()
    hosts = []
    for index, label in enumerate(DOMAIN_LABELS[:domains]):
        domain = f"{label}.test"  # RFC 2606 §2: .test is reserved for testing
        users = tuple(LabUser(f"{name}@{domain}", f"{name}-{label}") for name in USER_NAMES)
        hosts.append(LabHost(domain, f"mail.{domain}", addresses[index + 1],
                             directory / domain, users))
    return LabPlan(directory, net, addresses[0], tuple(hosts), ports or Ports())

"""A private Postfix instance for benchmarks: its own config, queue and data directories.

It listens only on 127.0.0.1:<port>, accepts mail for demo@example.test and delivers it with
the virtual(8) agent to <root>/maildirs/example.test/demo/. The system instance (/etc/postfix,
/var/spool/postfix) is never read, started or stopped: every command gets ``-c <root>/etc``
and MAIL_CONFIG. Postfix's durability defaults are kept: cleanup(8) fsyncs the queue file
before smtpd answers 250, and virtual(8) fsyncs each Maildir file before linking it into new/.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from bench.loopback import LOOPBACK, BenchError, require_loopback, wait_for_greeting
from bench.processes import (
    alive,
    descendants,
    register_stop,
    terminate,
    unregister_stop,
    wait_gone,
)

POSTFIX = Path("/usr/sbin/postfix")
POSTCONF = Path("/usr/sbin/postconf")
SMTP_SOURCE = Path("/usr/sbin/smtp-source")

DOMAIN = "example.test"
RECIPIENT = f"demo@{DOMAIN}"
# virtual(8) writes the Maildir as this user; "nobody" owns nothing else we care about.
MAILDIR_UID = 65534
MAILDIR_GID = 65534

# master.cf without chroot (column 5 "n"), and only the services this benchmark needs:
# no local(8), no smtp(8) client, no TLS. "-" in maxproc means default_process_limit.
_MASTER_CF = """\
{listen} inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def postfix_version() -> str:
    """The installed Postfix's mail_version, from its compiled-in defaults."""
    return _run([str(POSTCONF), "-d", "-h", "mail_version"], env=None).strip()


def _run(argv: list[str], env: dict[str, str] | None, timeout: float = 60.0) -> str:
    try:
        done = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{' '.join(argv)}: no answer within {timeout:.0f} s") from None
    if done.returncode != 0:
        raise BenchError(
            f"{' '.join(argv)} exited {done.returncode}: {(done.stderr or done.stdout).strip()}"
        )
    return done.stdout


class PostfixInstance:
    """One private Postfix under ``root`` (which must exist and be empty)."""

    name = "postfix"

    def __init__(self, root: Path, port: int, host: str = LOOPBACK) -> None:
        self.root = root
        self.host = require_loopback(host)
        self.port = port
        self.config_dir = root / "etc"
        self.queue_dir = root / "queue"
        self.data_dir = root / "data"
        self.maildirs = root / "maildirs"
        self.maillog = root / "maillog"
        self.maildir_new = self.maildirs / DOMAIN / "demo" / "new"
        self.master_pid: int | None = None
        self._known_pids: set[int] = set()
        self._stop_token: int | None = None

    def _env(self) -> dict[str, str]:
        return {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "MAIL_CONFIG": str(self.config_dir),
            "LANG": "C",
        }

    def _postfix(self, *args: str, timeout: float = 60.0) -> str:
        return _run([str(POSTFIX), "-c", str(self.config_dir), *args], self._env(), timeout)

    def settings(self) -> dict[str, str]:
        """main.cf for this instance; everything else is Postfix's compiled-in default."""
        root = self.root
        return {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "myhostname": "mail.example.test",
            "mydomain": DOMAIN,
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_banner": "$myhostname ESMTP Postfix (bench)",
            # Nothing leaves this machine and nothing is delivered to system users.
            "relayhost": "",
            "relay_domains": "",
            "default_transport": "error:outbound mail disabled in the benchmark",
            "relay_transport": "error:outbound mail disabled in the benchmark",
            "local_transport": "error:local delivery disabled in the benchmark",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            # No DNS: host names come from /etc/hosts and friends, never from a resolver query.
            "smtp_host_lookup": "native",
            "lmtp_host_lookup": "native",
            "smtp_dns_support_level": "disabled",
            # The one mailbox, in Maildir form (the trailing slash), owned by nobody.
            "virtual_mailbox_domains": DOMAIN,
            "virtual_mailbox_base": str(self.maildirs),
            "virtual_mailbox_maps": f"texthash:{self.config_dir / 'vmailbox'}",
            "virtual_uid_maps": f"static:{MAILDIR_UID}",
            "virtual_gid_maps": f"static:{MAILDIR_GID}",
            "virtual_alias_maps": "",
            # Logs go to a file through postlogd(8); no syslog needed.
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(root),
            # Room for 50+ parallel sessions from one client (loopback is in mynetworks and so
            # exempt from anvil limits anyway; these make that explicit).
            "default_process_limit": "200",
            "smtpd_client_connection_count_limit": "1000",
            "smtpd_client_connection_rate_limit": "0",
            "smtpd_client_message_rate_limit": "0",
            "smtpd_client_recipient_rate_limit": "0",
            "biff": "no",
            "append_dot_mydomain": "no",
            "readme_directory": "no",
            "html_directory": "no",
        }

    def write_config(self) -> None:
        """Create the directories and write main.cf (via postconf), master.cf and the map."""
        os.chmod(self.root, 0o755)  # the postfix and nobody users must reach queue and maildirs
        for path in (self.config_dir, self.queue_dir, self.data_dir, self.maildirs):
            path.mkdir(mode=0o755)
        os.chown(self.maildirs, MAILDIR_UID, MAILDIR_GID)
        (self.config_dir / "main.cf").write_text("# written by bench/postfix_instance.py\n")
        listen = f"{self.host}:{self.port}"
        (self.config_dir / "master.cf").write_text(_MASTER_CF.format(listen=listen))
        (self.config_dir / "vmailbox").write_text(f"{RECIPIENT} {DOMAIN}/demo/\n")
        _run(
            [str(POSTCONF), "-c", str(self.config_dir), "-e"]
            + [f"{key}={value}" for key, value in self.settings().items()],
            self._env(),
        )
        # Creates queue subdirectories and sets ownership (postfix:postdrop), as for any install.
        self._postfix("set-permissions")
        self._postfix("check")

    def start(self, timeout: float = 30.0) -> None:
        """Write the config, start master(8), and wait for smtpd's 220 greeting."""
        self.write_config()
        self._stop_token = register_stop(self.stop)
        self._postfix("start", timeout=timeout)
        pid_file = self.queue_dir / "pid" / "master.pid"
        deadline = time.monotonic() + timeout
        while self.master_pid is None and time.monotonic() < deadline:
            try:
                self.master_pid = int(pid_file.read_text().strip())
            except (OSError, ValueError):
                time.sleep(0.05)
        if self.master_pid is None:
            raise BenchError(f"postfix: no master pid in {pid_file} after {timeout:.0f} s")
        wait_for_greeting(
            self.host,
            self.port,
            timeout=max(1.0, deadline - time.monotonic()),
            alive=lambda: self.master_pid is not None and alive(self.master_pid),
        )

    @property
    def root_pid(self) -> int | None:
        return self.master_pid

    def pids(self) -> list[int]:
        """master(8) and every daemon it runs right now."""
        if self.master_pid is None:
            return []
        found = descendants([self.master_pid])
        self._known_pids.update(found)
        return found

    def stop(self) -> None:
        """``postfix stop``, then make sure, by pid, that master and its children are gone."""
        if self._stop_token is not None:
            unregister_stop(self._stop_token)
            self._stop_token = None
        if self.master_pid is None:
            return
        self.pids()
        try:
            self._postfix("stop", timeout=30.0)
        except BenchError as exc:
            print(f"bench: {exc}; terminating postfix by pid")
        # master(8) takes its children down with it on SIGTERM; give it time before we step in.
        survivors = terminate(wait_gone(self._known_pids, 10.0), timeout=10.0)
        if survivors:
            raise BenchError(f"postfix processes still alive after SIGKILL: {survivors}")
        self.master_pid = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.maillog.read_text(errors="replace")
        except OSError:
            return "(no maillog)"
        return "\n".join(text.splitlines()[-lines:])

    def describe(self) -> dict[str, str]:
        return {
            "version": postfix_version(),
            "durability": "cleanup fsyncs the queue file before 250; virtual fsyncs each "
            "Maildir file before linking it into new/ (defaults kept)",
            "processes": "master(8) and every daemon below it (smtpd, cleanup, qmgr, virtual, ...)",
        }


def require_tools() -> None:
    """Fail with an installation hint if Debian's postfix (smtp-source, postconf) is missing."""
    for tool in (POSTFIX, POSTCONF, SMTP_SOURCE):
        if not tool.exists() and shutil.which(tool.name) is None:
            raise BenchError(f"{tool} not found: install Debian's postfix package")

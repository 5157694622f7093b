"""The spam-filter hook against a real rspamd from Debian (installed by .ci/run), started on a
free loopback port with a minimal configuration: GTUBE is refused, a rule scoring into "add
header" sends the message to Junk, a clean message is delivered with its score; a filter that
is down never loses mail (accepted and marked, or 451 by configuration)."""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.integration.conftest import MailServer, free_port, wait_for

RSPAMD = shutil.which("rspamd")
# rspamd's built-in test pattern: the "reject" action (GTUBE).
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
START_DEADLINE = 180.0  # rspamd compiles its tables at start; slow on a loaded machine
RULE = """
rspamd_config:register_symbol({
  name = 'MAILSYS_TEST_SUBJECT',
  score = 7.0,
  callback = function(task)
    local subject = task:get_subject()
    return subject ~= nil and subject:find('SPAMMY', 1, true) ~= nil
  end,
})
"""


@pytest.fixture(scope="module")
def rspamd() -> Iterator[str]:
    """A real rspamd on a free loopback port; its URL. Stopped by its process id."""
    if RSPAMD is None:
        pytest.fail("rspamd is not installed (.ci/run installs the Debian package)")
    # Not under pytest's private temporary directory: rspamd's workers drop to nobody.
    directory = Path(tempfile.mkdtemp(prefix="mailsys-rspamd-"))
    directory.chmod(0o755)
    port = free_port()
    (directory / "db").mkdir()
    (directory / "db").chmod(0o777)
    # A small TLD list: the full one takes rspamd a minute to compile.
    (directory / "tld.dat").write_text("test\norg\ncom\n")
    (directory / "rules.lua").write_text(RULE)
    config = directory / "rspamd.conf"
    config.write_text(f"""
options {{
  pidfile = "{directory}/rspamd.pid";
  dbdir = "{directory}/db";
  filters = "";
  url_tld = "{directory}/tld.dat";
}}
logging {{
  type = "console";
  level = "notice";
}}
worker "normal" {{
  bind_socket = "127.0.0.1:{port}";
  count = 1;
}}
actions {{
  reject = 15;
  add_header = 6;
}}
lua = "{directory}/rules.lua";
""")
    command = [RSPAMD, "-f", "-c", str(config)]
    if os.geteuid() == 0:
        command += ["-u", "nobody", "-g", "nogroup"]  # rspamd refuses to run as root
    log = (directory / "rspamd.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError("rspamd exited: "
                                     + (directory / "rspamd.log").read_text(errors="replace"))
            try:
                with urllib.request.urlopen(url + "/ping", timeout=2) as answer:
                    return bool(answer.status == 200)
            except OSError:
                return False

        wait_for(ready, deadline=START_DEADLINE, interval=0.2, message="rspamd to answer")
        yield url
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # its own session: only its workers
                process.wait(timeout=20)
        log.close()
        shutil.rmtree(directory, ignore_errors=True)


def filtered(server_factory: Callable[..., MailServer], url: str, extra: str = "") -> MailServer:
    server = server_factory(extra_config=f"""
[defence]
exempt_networks = []
spam_filter = "{url}"
spam_filter_timeout = 5.0
{extra}""")
    server.start()
    return server


def send(server: MailServer, subject: str, body: str = "hello\n") -> None:
    msg = EmailMessage()
    msg["From"] = "sender@remote.test"
    msg["To"] = "demo@example.test"
    msg["Subject"] = subject
    msg.set_content(body)
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30, local_hostname="client.test",
                      source_address=("127.0.0.8", 0)) as client:
        client.send_message(msg)


def junk(server: MailServer) -> list[Path]:
    folder = server.maildirs / "example.test" / "demo" / ".Junk" / "new"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def test_rspamd_verdicts(server_factory: Callable[..., MailServer], rspamd: str) -> None:
    """reject → 554 5.7.1; add header → X-Spam: Yes in the Junk folder; no action → INBOX
    with X-Spam-Status."""
    server = filtered(server_factory, rspamd)
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(server, "test pattern", GTUBE + "\n")
    assert refused.value.smtp_code == 554
    assert refused.value.smtp_error.startswith(b"5.7.1 ")
    send(server, "SPAMMY offer")
    files = wait_for(lambda: junk(server), deadline=20, message="the Junk copy")
    assert isinstance(files, list)
    stored = files[0].read_bytes()
    assert b"X-Spam: Yes" in stored and b"action=add_header" in stored
    send(server, "a clean one")
    inbox = wait_for(lambda: server.inbox_files(), deadline=20, message="the clean copy")
    assert isinstance(inbox, list)
    assert b"X-Spam-Status: No, score=0.00" in inbox[0].read_bytes()


def test_rspamd_down_accepts_and_marks(server_factory: Callable[..., MailServer]) -> None:
    """Nothing listens at the filter's address: the message is accepted and marked."""
    server = filtered(server_factory, f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    send(server, "filter down")
    assert time.monotonic() - started < 15
    inbox = wait_for(lambda: server.inbox_files(), deadline=20, message="the marked copy")
    assert isinstance(inbox, list)
    assert b"X-Mailsys-Defence: spam-filter=unavailable" in inbox[0].read_bytes()


def test_rspamd_down_defers_when_configured(server_factory: Callable[..., MailServer]) -> None:
    """With spam_filter_failure = "defer", a filter that is down gets the client 451 4.7.1."""
    server = filtered(server_factory, f"http://127.0.0.1:{free_port()}",
                      'spam_filter_failure = "defer"\n')
    with pytest.raises(smtplib.SMTPDataError) as deferred:
        send(server, "filter down")
    assert deferred.value.smtp_code == 451
    assert not server.inbox_files()

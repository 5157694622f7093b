"""What the journey web page's tests share: a server with the page on, and a client that keeps
cookies, logs in with the form's CSRF token, and reads an event stream."""

from __future__ import annotations

import http.client
import http.cookiejar
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.integration.conftest import MailServer, free_port, wait_for

ADMIN = "demo@example.test"
ADMIN_PASSWORD = "demo"
USER = "second@example.test"
USER_PASSWORD = "second-password"


def web_config(directory: Path, web_port: int, imap_port: int = 0) -> str:
    """[web], [journey] and (when a port is given) an IMAPS listener."""
    imap = f"""
[imap]
listen = []
listen_tls = ["tcp:{imap_port}:interface=127.0.0.1"]
""" if imap_port else ""
    return imap + f"""
[web]
listen = ["tcp:{web_port}:interface=127.0.0.1"]

[journey]
enabled = true
path = "{directory}/var/journey.sqlite"
"""


@dataclass
class Answer:
    status: int
    body: str
    url: str
    headers: dict[str, str]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class WebClient:
    """A browser-like client of the page at 127.0.0.1:``port`` with its own cookies."""

    def __init__(self, port: int, follow: bool = True) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.jar = http.cookiejar.CookieJar()
        handlers: list[Any] = [urllib.request.HTTPCookieProcessor(self.jar)]
        if not follow:
            handlers.append(_NoRedirect())
        self.opener = urllib.request.build_opener(*handlers)

    def request(self, path: str, form: dict[str, str] | None = None,
                headers: dict[str, str] | None = None, method: str | None = None) -> Answer:
        data = None if form is None else urllib.parse.urlencode(form).encode()
        request = urllib.request.Request(self.base + path, data=data, headers=headers or {},
                                         method=method)
        try:
            with self.opener.open(request, timeout=30) as response:
                return Answer(response.status, response.read().decode("utf-8"),
                              response.geturl(), dict(response.headers))
        except urllib.error.HTTPError as error:
            return Answer(error.code, error.read().decode("utf-8", "replace"), error.geturl(),
                          dict(error.headers))

    def get(self, path: str, **kwargs: Any) -> Answer:
        return self.request(path, **kwargs)

    def post(self, path: str, form: dict[str, str], **kwargs: Any) -> Answer:
        return self.request(path, form=form, **kwargs)

    def login(self, user: str = ADMIN, password: str = ADMIN_PASSWORD,
              following: str = "/messages") -> Answer:
        page = self.get("/login")
        answer = self.post("/login", {"user": user, "password": password,
                                      "csrf": csrf_of(page.body), "next": following})
        return answer

    def csrf(self) -> str:
        """The session's CSRF token, from a page's logout form."""
        return csrf_of(self.get("/messages").body)

    def cookie_header(self) -> str:
        return "; ".join(f"{cookie.name}={cookie.value}" for cookie in self.jar)

    def journey_json(self, queue_id: str) -> dict[str, Any]:
        answer = self.get(f"/api/journey/{queue_id}")
        assert answer.status == 200, answer
        document: dict[str, Any] = json.loads(answer.body)
        return document

    def wait_for_steps(self, queue_id: str, until: Callable[[list[dict[str, Any]]], bool],
                       deadline: float = 20.0) -> list[dict[str, Any]]:
        seen: list[str] = []

        def ready() -> list[dict[str, Any]] | None:
            answer = self.get(f"/api/journey/{queue_id}")
            if answer.status != 200:
                return None
            steps: list[dict[str, Any]] = json.loads(answer.body)["journeys"][0]["steps"]
            seen[:] = [f"{s['kind']}: {s['text']}" for s in steps]
            return steps if until(steps) else None

        try:
            found = wait_for(ready, deadline=deadline, message=f"the journey of {queue_id}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the steps so far: {seen}") from None
        assert isinstance(found, list)
        return found

    def queue_ids(self, query: str = "") -> list[str]:
        page = self.get("/messages?" + urllib.parse.urlencode({"q": query}))
        return re.findall(r'class="journey-link" href="/journey/([A-Za-z0-9]+)"', page.body)


class EventStream:
    """An open text/event-stream response, read event by event."""

    def __init__(self, client: WebClient, path: str) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", client.port, timeout=30)
        self.connection.request("GET", path, headers={"Cookie": client.cookie_header(),
                                                      "Accept": "text/event-stream"})
        self.response = self.connection.getresponse()
        self.status = self.response.status
        self.content_type = self.response.getheader("content-type") or ""
        self._buffer = b""

    def events(self, until: Callable[[list[dict[str, Any]]], bool],
               deadline: float = 20.0) -> list[dict[str, Any]]:
        """Step events received until ``until`` holds for them, or fail after ``deadline``."""
        end = time.monotonic() + deadline
        received: list[dict[str, Any]] = []
        while time.monotonic() < end:
            chunk = self.response.read1(65536)
            if not chunk:
                break
            self._buffer += chunk
            while b"\n\n" in self._buffer:
                block, self._buffer = self._buffer.split(b"\n\n", 1)
                lines = block.decode("utf-8").split("\n")
                if "event: step" in lines:
                    data = next(line[6:] for line in lines if line.startswith("data: "))
                    received.append(json.loads(data))
            if until(received):
                return received
        raise AssertionError(f"the stream ended or timed out with {received}")

    def ended(self, deadline: float = 10.0) -> bool:
        """True once the server closes the stream (read to its end within ``deadline``)."""
        self.connection.sock.settimeout(deadline)  # type: ignore[union-attr]
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if not self.response.read1(65536):
                return True
        return False

    def close(self) -> None:
        self.connection.close()


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, html[:2000]
    return match.group(1)


def start_console(server_factory: Callable[..., MailServer], name: str = "server",
                  imap: bool = True, **fields: Any) -> tuple[MailServer, WebClient, int]:
    """A started server with the page and recording on, a second (not admin) user, and the
    IMAPS port (0 without)."""
    web_port = free_port()
    imap_port = free_port() if imap else 0
    directory = Path(fields.pop("directory"))
    extra = fields.pop("extra_config", "")
    server = server_factory(name, extra_config=web_config(directory / name, web_port,
                                                          imap_port) + extra, **fields)
    server.start()
    server.add_user(USER, USER_PASSWORD)
    client = WebClient(web_port)
    wait_for(lambda: _answers(client), message="the web listener")
    return server, client, imap_port


def _answers(client: WebClient) -> bool:
    try:
        return client.get("/livez").status == 200
    except OSError:
        return False

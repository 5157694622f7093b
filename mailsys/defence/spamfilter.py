"""The spam-filter hook: rspamd over its HTTP protocol (``POST /checkv2``).

The message goes as the request body with the envelope as headers (IP, Helo, From, Rcpt,
Queue-Id, User, as rspamd's protocol names them); the answer's ``action`` decides:
"reject" → 554 5.7.1, "soft reject" → 451 4.7.1, "greylist" → 450 4.7.1, "add header" and
"rewrite subject" → ``X-Spam: Yes`` and (``spam_filter_junk``) the Junk folder; every
accepted message gets ``X-Spam-Status`` with the score. A filter that is down, slow (past
``spam_filter_timeout``) or answers garbage never loses mail: by configuration the message is
accepted and marked, or deferred with 451 4.7.1. Everything runs on the reactor through
twisted.web's client, the reactor passed in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from mailsys import replies
from mailsys.defence.intake import MessageDetails, MessageVerdict

log = Logger(namespace="mailsys.defence.spamfilter")

# rspamd's answer is a few kilobytes of symbols; a megabyte is garbage.
MAX_ANSWER = 1024 * 1024


@implementer(IBodyProducer)
class _Body:
    """The message as a request body, written at once (it is in memory already)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:  # noqa: N802 - Twisted's
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:  # noqa: N802 - Twisted's
        pass

    def resumeProducing(self) -> None:  # noqa: N802 - Twisted's
        pass

    def stopProducing(self) -> None:  # noqa: N802 - Twisted's
        pass


@dataclass(frozen=True)
class FilterAnswer:
    """What rspamd said: its action, score and the score its rules require."""

    action: str
    score: float
    required: float


def parse_answer(body: bytes) -> FilterAnswer:
    """rspamd's /checkv2 JSON answer; ValueError when it is not one."""
    if len(body) > MAX_ANSWER:
        raise ValueError("answer too long")
    data: Any = json.loads(body)
    if not isinstance(data, dict) or not isinstance(data.get("action"), str):
        raise ValueError("no action in the answer")
    score = data.get("score", 0.0)
    required = data.get("required_score", 0.0)
    if not isinstance(score, int | float) or not isinstance(required, int | float):
        raise ValueError("score is not a number")
    return FilterAnswer(data["action"], float(score), float(required))


class RspamdFilter:
    """A ContentFilter (mailsys.defence.intake) asking rspamd at ``url``."""

    def __init__(self, url: str, reactor: Any, *, timeout: float = 10.0,
                 on_failure: str = "accept", junk: bool = True) -> None:
        self.url = url.rstrip("/").encode("ascii") + b"/checkv2"
        self._reactor = reactor
        self.timeout = timeout
        self.on_failure = on_failure
        self.junk = junk
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 4
        self._agent = Agent(reactor, pool=pool, connectTimeout=timeout)

    def check(self, message: bytes, details: MessageDetails) -> Deferred[MessageVerdict]:
        """The verdict on ``message``; never fails."""
        headers = Headers({
            b"IP": [details.client_address.encode("ascii", "replace")],
            b"Helo": [details.helo.encode("utf-8", "replace")],
            b"From": [details.sender.encode("utf-8", "replace")],
            b"Rcpt": [r.encode("utf-8", "replace") for r in details.recipients],
            b"Queue-Id": [details.queue_id.encode("ascii", "replace")],
            b"Content-Type": [b"message/rfc822"],
        })
        if details.user is not None:
            headers.addRawHeader(b"User", details.user.encode("utf-8", "replace"))
        d = self._agent.request(b"POST", self.url, headers, _Body(message))
        d.addCallback(self._read)
        d.addTimeout(self.timeout, self._reactor)
        return d.addCallbacks(self.verdict, self._failed, errbackArgs=(details,))

    def _read(self, response: IResponse) -> Deferred[bytes]:
        if response.code != 200:
            raise ValueError(f"HTTP status {response.code}")
        body: Deferred[bytes] = readBody(response)
        return body

    def verdict(self, body: bytes) -> MessageVerdict:
        """The verdict an answer body of rspamd stands for; ValueError when it is none."""
        answer = parse_answer(body)
        action = answer.action.lower()
        status = (f"X-Spam-Status: {'Yes' if action not in ('no action', 'greylist') else 'No'}"
                  f", score={answer.score:.2f} required={answer.required:.2f}"
                  f" action={action.replace(' ', '_')}\r\n").encode("ascii", "replace")
        if action == "reject":
            return MessageVerdict(replies.SPAM_REJECTED)
        if action == "soft reject":
            return MessageVerdict(replies.SPAM_DEFERRED)
        if action == "greylist":
            return MessageVerdict(replies.GREYLISTED)
        if action in ("add header", "rewrite subject"):
            return MessageVerdict(None, b"X-Spam: Yes\r\n" + status, self.junk)
        return MessageVerdict(None, status)

    def _failed(self, failure: Failure, details: MessageDetails) -> MessageVerdict:
        log.info("{queue_id}: spam filter {url} unavailable: {why}; {what}",
                 queue_id=details.queue_id, url=self.url.decode(),
                 why=failure.getErrorMessage() or repr(failure.value),
                 what="accepted and marked" if self.on_failure == "accept" else "deferred")
        if self.on_failure == "defer":
            return MessageVerdict(replies.FILTER_UNAVAILABLE, marks=("spam-filter=unavailable",))
        return MessageVerdict(marks=("spam-filter=unavailable",))

"""The Authentication-Results header field (RFC 8601): written once per message with our
authserv-id, and any copy claiming our authserv-id removed from incoming mail first (§5), so no
sender can forge our verdict."""

from __future__ import annotations

import re
from collections.abc import Sequence

from mailsys.authn.dkim import DKIMResult
from mailsys.authn.dmarc import DMARCResult
from mailsys.authn.iprev import IprevResult
from mailsys.authn.spf import SPFResult

FIELD = b"Authentication-Results"
# RFC 2045 §5.1: a token is any printable US-ASCII but SPACE and tspecials.
_TOKEN = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+")
_ADDRESS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.\-]+@[A-Za-z0-9.\-]+|[A-Za-z0-9.\-]+")
MAX_REASON = 120


def _value(text: str) -> str:
    """A token as is, anything else as a quoted-string (RFC 8601 §2.2 value)."""
    if _TOKEN.fullmatch(text):
        return text
    cleaned = "".join(c if 0x20 <= ord(c) < 0x7F else "?" for c in text)
    return '"' + cleaned.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _pvalue(text: str) -> str:
    """A property value: an address or domain as is when it parses, else a quoted-string."""
    return text if _ADDRESS.fullmatch(text) else _value(text)


def _reason(problem: str) -> str:
    return f" reason={_value(problem[:MAX_REASON])}" if problem else ""


def _spf(result: SPFResult) -> str:
    if result.identity == "helo":
        prop = f"smtp.helo={_pvalue(result.domain)}"
    else:
        prop = f"smtp.mailfrom={_pvalue(result.sender)}"
    return f"spf={result.result}{_reason(result.problem)} {prop}"


def _dkim(result: DKIMResult) -> str:
    props = []
    if result.domain:
        props.append(f"header.d={_pvalue(result.domain)}")
    if result.selector:
        props.append(f"header.s={_value(result.selector)}")
    if result.algorithm:
        props.append(f"header.a={_value(result.algorithm)}")
    if result.header_b:
        props.append(f"header.b={_value(result.header_b)}")
    bits = f" ({result.key_bits}-bit key)" if result.key_bits and result.result == "pass" else ""
    tail = (" " + " ".join(props)) if props else ""
    return f"dkim={result.result}{bits}{_reason(result.problem)}{tail}"


def _dmarc(result: DMARCResult) -> str:
    comment = f" (p={result.policy})" if result.result == "fail" else ""
    reason = _reason(result.problem) if result.result != "none" else ""
    prop = f" header.from={_pvalue(result.from_domain)}" if result.from_domain else ""
    return f"dmarc={result.result}{comment}{reason}{prop}"


def _iprev(result: IprevResult) -> str:
    name = f" ({result.name})" if result.name else ""
    return f"iprev={result.result}{_reason(result.problem)} policy.iprev={result.ip}{name}"


def authentication_results(
    authserv_id: str,
    *,
    spf: Sequence[SPFResult] = (),
    dkim: Sequence[DKIMResult] | None = None,
    dmarc: DMARCResult | None = None,
    iprev: IprevResult | None = None,
) -> bytes:
    """The whole field, CRLF-terminated, one method per folded line (RFC 8601 §2.2). ``dkim``
    None leaves DKIM out; an empty list says dkim=none (no signature)."""
    infos = [_iprev(iprev)] if iprev is not None else []
    infos += [_spf(r) for r in spf]
    if dkim is not None:
        infos += [_dkim(r) for r in dkim] if dkim else ["dkim=none"]
    if dmarc is not None:
        infos.append(_dmarc(dmarc))
    head = f"{FIELD.decode()}: {_value(authserv_id)}"
    body = "".join(f";\r\n\t{info}" for info in infos) if infos else "; none"
    return (head + body + "\r\n").encode("ascii", "replace")


def _authserv_id(value: bytes) -> str:
    """The authserv-id of a field value: the first value after any comments."""
    text = re.sub(rb"\r?\n[ \t]", b" ", value).decode("ascii", "replace").strip()
    while text.startswith("("):  # a comment, possibly nested
        depth = 0
        for index, char in enumerate(text):
            depth += char == "("
            depth -= char == ")"
            if depth == 0:
                text = text[index + 1:].lstrip()
                break
        else:
            return ""
    if text.startswith('"'):
        match = re.match(r'"((?:[^"\\]|\\.)*)"', text)
        return re.sub(r"\\(.)", r"\1", match.group(1)).lower() if match else ""
    match = re.match(r"[^\s;()]+", text)
    return match.group(0).lower() if match else ""


def strip_authentication_results(message: bytes, authserv_id: str) -> tuple[bytes, int]:
    """``message`` without the Authentication-Results fields that claim ``authserv_id``
    (RFC 8601 §5), and how many were removed. Other fields and the body are untouched."""
    end = message.find(b"\r\n\r\n")
    header, rest = (message, b"") if end < 0 else (message[:end + 2], message[end + 2:])
    if FIELD.lower() not in header.lower():
        return message, 0
    ours = authserv_id.lower()
    kept: list[bytes] = []
    removed = 0
    for field_bytes in re.findall(rb"[^\r\n]*\r?\n(?:[ \t][^\r\n]*\r?\n)*|[^\r\n]+\Z", header):
        name, colon, value = field_bytes.partition(b":")
        if colon and name.strip().lower() == FIELD.lower() and _authserv_id(value) == ours:
            removed += 1
            continue
        kept.append(field_bytes)
    return b"".join(kept) + rest, removed

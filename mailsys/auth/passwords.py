"""Password hashes in Dovecot's passwd-file notation: ``{SCHEME}hash``, made and checked here.

New passwords are always hashed with Argon2id. Checking also accepts what an administrator may
import from Dovecot or another system: ARGON2I, SHA512-CRYPT, SHA256-CRYPT, BLF-CRYPT (bcrypt),
PLAIN and CLEAR. Every function here is blocking and CPU-heavy: callers run them in a thread,
never on the reactor.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading

import argon2
import bcrypt
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

# Argon2id with 32 MiB, 3 passes, 2 lanes: about 50 ms on a 2-core machine. argon2-cffi's
# defaults (64 MiB, 4 lanes, RFC 9106 §4 second recommendation) took 100-150 ms here, and each
# concurrent login holds that much memory; this stays well above OWASP's minimum (19 MiB, t=2).
_HASHER = argon2.PasswordHasher(time_cost=3, memory_cost=32 * 1024, parallelism=2)

DEFAULT_SCHEME = "ARGON2ID"

# bcrypt only ever looks at the first 72 bytes; bcrypt>=5 raises on longer input instead of
# truncating, but hashes imported from libxcrypt/Dovecot were made with the truncation.
_BCRYPT_MAX = 72

_SCHEME = re.compile(r"^\{([A-Za-z0-9._-]+)\}")


class UnusableHashError(ValueError):
    """A stored hash that cannot be checked: unknown scheme, or not well formed for its scheme."""


def hash_password(password: str) -> str:
    """Hash ``password`` for the user store: ``{ARGON2ID}$argon2id$v=19$...`` (blocking)."""
    return "{" + DEFAULT_SCHEME + "}" + _HASHER.hash(_to_bytes(password))


def verify_password(stored: str, password: str) -> bool:
    """True if ``password`` matches ``stored`` (blocking; comparisons are constant-time).

    ``stored`` is ``{SCHEME}hash``; a bare crypt string (``$6$...``, ``$2y$...``,
    ``$argon2id$...``) is read as Dovecot's ``{CRYPT}``. Raises UnusableHashError when the stored
    value cannot be checked at all, so that a broken entry is reported rather than looking like a
    wrong password.
    """
    scheme, value = split_scheme(stored)
    secret = _to_bytes(password)
    if scheme == "CRYPT":
        scheme = _crypt_scheme(value)
    if scheme in ("ARGON2ID", "ARGON2I"):
        prefix = "$argon2id$" if scheme == "ARGON2ID" else "$argon2i$"
        if not value.startswith(prefix):
            raise UnusableHashError(f"{{{scheme}}} hash does not start with {prefix}")
        try:
            return _HASHER.verify(value, secret)
        except VerifyMismatchError:
            return False
        except (InvalidHashError, VerificationError):  # e.g. "Decoding failed"
            raise UnusableHashError(f"malformed {{{scheme}}} hash") from None
    if scheme in ("SHA512-CRYPT", "SHA256-CRYPT"):
        return hmac.compare_digest(_sha_crypt(secret, value, scheme).encode("ascii"),
                                   value.encode("ascii", "replace"))
    if scheme == "BLF-CRYPT":
        try:
            return bcrypt.checkpw(secret[:_BCRYPT_MAX], value.encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            raise UnusableHashError("malformed {BLF-CRYPT} hash") from None
    if scheme in ("PLAIN", "CLEAR"):
        return hmac.compare_digest(_to_bytes(value), secret)
    raise UnusableHashError(f"unsupported password scheme {{{scheme}}}")


# What each checkable scheme's hash starts with (PLAIN and CLEAR hold the password itself).
_SCHEME_PREFIXES = {
    "ARGON2ID": ("$argon2id$",),
    "ARGON2I": ("$argon2i$",),
    "SHA512-CRYPT": ("$6$",),
    "SHA256-CRYPT": ("$5$",),
    "BLF-CRYPT": ("$2a$", "$2b$", "$2y$"),
    "PLAIN": ("",),
    "CLEAR": ("",),
}


def hash_scheme(stored: str) -> str:
    """The scheme ``verify_password`` checks ``stored`` with ({CRYPT} named by its prefix).

    Raises UnusableHashError for a scheme it cannot check or a hash not of its scheme's form.
    Cheap (nothing is hashed): for checking hashes before they are imported.
    """
    scheme, value = split_scheme(stored)
    if scheme == "CRYPT":
        scheme = _crypt_scheme(value)
    prefixes = _SCHEME_PREFIXES.get(scheme)
    if prefixes is None:
        raise UnusableHashError(f"unsupported password scheme {{{scheme}}}")
    if not value or not value.startswith(prefixes):
        raise UnusableHashError(f"{{{scheme}}} hash does not start with {' or '.join(prefixes)}"
                                if prefixes[0] else f"{{{scheme}}} with an empty password")
    return scheme


def needs_rehash(stored: str) -> bool:
    """True if ``stored`` is not Argon2id with today's parameters (re-hash at the next login)."""
    try:
        scheme, value = split_scheme(stored)
    except UnusableHashError:
        return True
    if scheme != DEFAULT_SCHEME or not value.startswith("$argon2id$"):
        return True
    try:
        return _HASHER.check_needs_rehash(value)
    except (InvalidHashError, VerificationError, ValueError):
        return True


def split_scheme(stored: str) -> tuple[str, str]:
    """Split ``{SCHEME}hash`` into ("SCHEME", "hash"); the scheme name is case-insensitive."""
    match = _SCHEME.match(stored)
    if match is None:
        if stored.startswith("$"):
            return "CRYPT", stored
        raise UnusableHashError("stored password has no {SCHEME} prefix")
    return match.group(1).upper(), stored[match.end():]


_dummy_lock = threading.Lock()
_dummy: str | None = None


def dummy_hash() -> str:
    """A hash of a random password, made once: checking an unknown user against it costs the
    same as a wrong password, so response time does not tell which users exist."""
    global _dummy
    with _dummy_lock:
        if _dummy is None:
            _dummy = hash_password(secrets.token_urlsafe(24))
        return _dummy


def _to_bytes(text: str) -> bytes:
    # surrogateescape: a password decoded from non-UTF-8 bytes still hashes as those bytes.
    return text.encode("utf-8", "surrogateescape")


def _crypt_scheme(value: str) -> str:
    """Dovecot's {CRYPT} is crypt(3): the algorithm is named by the string's own prefix."""
    for prefix, scheme in (("$argon2id$", "ARGON2ID"), ("$argon2i$", "ARGON2I"),
                           ("$6$", "SHA512-CRYPT"), ("$5$", "SHA256-CRYPT"),
                           ("$2a$", "BLF-CRYPT"), ("$2b$", "BLF-CRYPT"), ("$2y$", "BLF-CRYPT")):
        if value.startswith(prefix):
            return scheme
    # DES and MD5 crypt are deliberately not accepted: they are too weak to keep.
    raise UnusableHashError("unsupported crypt(3) hash (only $6$, $5$, $2?$ and $argon2*$)")


# SHA-crypt, as specified by Ulrich Drepper ("Unix crypt using SHA-256 and SHA-512", 2007),
# which glibc, libxcrypt, OpenSSL (`openssl passwd -5/-6`) and Dovecot implement. Done here
# because Python's crypt module is deprecated and gone in 3.13 (PEP 594), and passlib is
# unmaintained; the algorithm is short and checked against known answers in the tests.

_CRYPT_B64 = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_ROUNDS_DEFAULT = 5000
_ROUNDS_MIN = 1000
_ROUNDS_MAX = 999_999_999
_SALT_MAX = 16

# The byte order in which the final digest is encoded: groups of three bytes, most significant
# first, each written as four base-64 characters, least significant six bits first.
# For SHA-512 the groups are (0, 21, 42), (22, 43, 1), (44, 2, 23), ...; for SHA-256 (0, 10, 20),
# (21, 1, 11), (12, 22, 2), ...; the last one or two bytes are encoded on their own.
_SHA512_ORDER = [(i, (i + 21) % 63, (i + 42) % 63) for i in ((22 * k) % 63 for k in range(21))]
_SHA256_ORDER = [(i, (i + 10) % 30, (i + 20) % 30) for i in ((21 * k) % 30 for k in range(10))]


def _b64_from_24bit(b2: int, b1: int, b0: int, count: int) -> str:
    word = (b2 << 16) | (b1 << 8) | b0
    out = []
    for _ in range(count):
        out.append(_CRYPT_B64[word & 0x3F])
        word >>= 6
    return "".join(out)


def _sha_crypt(password: bytes, stored: str, scheme: str) -> str:
    """Recompute the SHA-crypt string for ``password`` with the salt and rounds of ``stored``."""
    ident = "6" if scheme == "SHA512-CRYPT" else "5"
    name, size = ("sha512", 64) if ident == "6" else ("sha256", 32)
    if not stored.startswith(f"${ident}$"):
        raise UnusableHashError(f"{{{scheme}}} hash does not start with ${ident}$")
    rest = stored[3:]
    rounds = _ROUNDS_DEFAULT
    custom_rounds = False
    if rest.startswith("rounds="):
        spec, sep, rest = rest[len("rounds="):].partition("$")
        if not sep or not spec.isdigit():
            raise UnusableHashError(f"malformed rounds in {{{scheme}}} hash")
        rounds = min(max(int(spec), _ROUNDS_MIN), _ROUNDS_MAX)
        custom_rounds = True
    salt_text = rest.split("$", 1)[0][:_SALT_MAX]
    try:
        salt = salt_text.encode("ascii")
    except UnicodeEncodeError:
        raise UnusableHashError(f"malformed salt in {{{scheme}}} hash") from None

    def digest(*parts: bytes) -> bytes:
        h = hashlib.new(name)
        for part in parts:
            h.update(part)
        return h.digest()

    plen = len(password)
    alternate = digest(password, salt, password)
    a = hashlib.new(name, password + salt)
    a.update(alternate * (plen // size) + alternate[: plen % size])
    n = plen
    while n:
        a.update(alternate if n & 1 else password)
        n >>= 1
    result = a.digest()
    dp = digest(password * plen)
    p_bytes = (dp * (plen // size + 1))[:plen]
    ds = digest(salt * (16 + result[0]))
    s_bytes = (ds * (len(salt) // size + 1))[: len(salt)]
    for i in range(rounds):
        h = hashlib.new(name, p_bytes if i & 1 else result)
        if i % 3:
            h.update(s_bytes)
        if i % 7:
            h.update(p_bytes)
        h.update(result if i & 1 else p_bytes)
        result = h.digest()

    if ident == "6":
        encoded = "".join(_b64_from_24bit(result[x], result[y], result[z], 4)
                          for x, y, z in _SHA512_ORDER)
        encoded += _b64_from_24bit(0, 0, result[63], 2)
    else:
        encoded = "".join(_b64_from_24bit(result[x], result[y], result[z], 4)
                          for x, y, z in _SHA256_ORDER)
        encoded += _b64_from_24bit(0, result[31], result[30], 3)
    head = f"${ident}$" + (f"rounds={rounds}$" if custom_rounds else "")
    return f"{head}{salt_text}${encoded}"

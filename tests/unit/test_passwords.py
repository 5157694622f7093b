"""Password hashes: Argon2id for new ones, and every imported Dovecot scheme, by known answers."""

from __future__ import annotations

import random
import string
import warnings

import pytest

from mailsys.auth import passwords
from mailsys.auth.passwords import (
    UnusableHashError,
    dummy_hash,
    hash_password,
    hash_scheme,
    needs_rehash,
    split_scheme,
    verify_password,
)

# Known answers. SHA-crypt: the first two of each are the examples of Drepper's specification,
# the others were made with `openssl passwd -6/-5 -salt Qx7pW2nz` and Python's crypt module.
SHA512_VECTORS = [
    ("Hello world!", "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4"
                     "OTLiBFdcbYEdFCoEOfaS35inz1"),
    ("Hello world!", "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSn"
                     "CM/UrjmM0Dp8vOuZeHBy/YTBmSK6H9qs/y3RnOaw5v."),
    ("correct horse", "$6$Qx7pW2nz$Zj7H8u3fy0SYP6wrytZKQnD2jKT1Bzo0fZvPblWrFie.J1IEhE7azCz6Gp8s9N"
                      "yhXlOdtMAtnYPrjoMMl/J.q1"),
    ("ünïcode", "$6$abc$357CreSCSTUeyhT3LRO9Z6HSTACAcjKGkl3FVXWjtb34pil9bXGM0qF4hvKfyRJhAROPeIza/f"
                "9vqoFqaaWYd0"),
]
SHA256_VECTORS = [
    ("Hello world!", "$5$saltstring$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZaBBGWEc5"),
    ("Hello world!",
     "$5$rounds=10000$saltstringsaltst$3xv.VbSHBb41AL9AvLeujZkZRBAwqFMz2.opqey6IcA"),
    ("correct horse", "$5$Qx7pW2nz$lcxZCs9mUJ/Iyna0kX0f3T8P6uAL2DtX75VYAhVDOz6"),
]
BCRYPT = "$2b$04$3FNzQMmCzW9mkofcBsZicuzT5FLspk5Q8yn5b.kpIHc0V3pfPfa8G"  # "correct horse"
BCRYPT_LONG = "$2b$04$abcdefghijklmnopqrstuuBzzIgyKkz7xMWYSzkIjUSnxEQFQ0WNe"  # "a" * 80, libxcrypt
ARGON2ID = ("$argon2id$v=19$m=1024,t=1,p=1$BnGPPAiEifbuhP9D4OHA1Q$"
            "YDx/I3uDMzyYhNYo+V4tZSa/e8+Oh5FHC0pKxK3vyJA")  # "correct horse"
ARGON2I = ("$argon2i$v=19$m=1024,t=1,p=1$buY90ZOm89M6ZwYE3y9K9g$"
           "mBkGCStNjXJmGFE6JC+OUapmrvZ4QAiA0+k+xGjm3H0")  # "correct horse"


def test_new_hashes_are_argon2id_in_dovecot_notation() -> None:
    """A new hash is {ARGON2ID}$argon2id$v=19$... and checks its own password only."""
    stored = hash_password("s3cret")
    assert stored.startswith("{ARGON2ID}$argon2id$v=19$m=32768,t=3,p=2$")
    assert verify_password(stored, "s3cret")
    assert not verify_password(stored, "s3cret ")
    assert hash_password("s3cret") != stored  # a fresh salt every time


@pytest.mark.parametrize(("password", "stored"), SHA512_VECTORS)
def test_sha512_crypt_known_answers(password: str, stored: str) -> None:
    """{SHA512-CRYPT} matches Drepper's examples and OpenSSL's output, rounds= included."""
    assert verify_password("{SHA512-CRYPT}" + stored, password)
    assert not verify_password("{SHA512-CRYPT}" + stored, password + "!")


@pytest.mark.parametrize(("password", "stored"), SHA256_VECTORS)
def test_sha256_crypt_known_answers(password: str, stored: str) -> None:
    """{SHA256-CRYPT} matches Drepper's examples and OpenSSL's output, rounds= included."""
    assert verify_password("{SHA256-CRYPT}" + stored, password)
    assert not verify_password("{SHA256-CRYPT}" + stored, password.upper())


def test_sha_crypt_agrees_with_the_system_crypt() -> None:
    """Our SHA-crypt gives crypt(3)'s answer for passwords around every block-size boundary."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        crypt = pytest.importorskip("crypt")  # gone in Python 3.13; the vectors above remain
    rng = random.Random(5321)
    for method, scheme in ((crypt.METHOD_SHA512, "SHA512-CRYPT"),
                           (crypt.METHOD_SHA256, "SHA256-CRYPT")):
        for length in (0, 1, 31, 32, 33, 63, 64, 65, 129):
            password = "".join(rng.choice(string.printable) for _ in range(length))
            stored = crypt.crypt(password, crypt.mksalt(method))
            assert passwords._sha_crypt(password.encode(), stored, scheme) == stored


def test_bcrypt_known_answer() -> None:
    """{BLF-CRYPT} checks bcrypt hashes in the $2b$ and Dovecot's usual $2y$ spelling."""
    assert verify_password("{BLF-CRYPT}" + BCRYPT, "correct horse")
    assert not verify_password("{BLF-CRYPT}" + BCRYPT, "correct horsE")
    assert verify_password("{BLF-CRYPT}$2y$" + BCRYPT[4:], "correct horse")


def test_bcrypt_long_passwords_are_truncated_like_libxcrypt() -> None:
    """bcrypt looks at 72 bytes; a longer password checks as crypt(3) made it, not an error."""
    assert verify_password("{BLF-CRYPT}" + BCRYPT_LONG, "a" * 80)
    assert verify_password("{BLF-CRYPT}" + BCRYPT_LONG, "a" * 72)
    assert not verify_password("{BLF-CRYPT}" + BCRYPT_LONG, "a" * 71)


def test_argon2id_and_argon2i_known_answers() -> None:
    """{ARGON2ID} and {ARGON2I} check hashes made with other parameters than ours."""
    assert verify_password("{ARGON2ID}" + ARGON2ID, "correct horse")
    assert not verify_password("{ARGON2ID}" + ARGON2ID, "wrong horse")
    assert verify_password("{ARGON2I}" + ARGON2I, "correct horse")
    assert not verify_password("{ARGON2I}" + ARGON2I, "wrong horse")


def test_argon2_scheme_must_match_the_hash_variant() -> None:
    """An {ARGON2I} label on an argon2id hash is refused as unusable, not guessed."""
    with pytest.raises(UnusableHashError):
        verify_password("{ARGON2I}" + ARGON2ID, "correct horse")


@pytest.mark.parametrize("scheme", ["PLAIN", "CLEAR", "plain"])
def test_plain_and_clear(scheme: str) -> None:
    """{PLAIN} and {CLEAR} (scheme names case-insensitive) compare the text itself."""
    assert verify_password("{" + scheme + "}pa:ss wörd", "pa:ss wörd")
    assert not verify_password("{" + scheme + "}pa:ss wörd", "pa:ss word")
    assert not verify_password("{" + scheme + "}", "x")


def test_crypt_scheme_and_bare_crypt_strings() -> None:
    """{CRYPT} and a bare crypt string are checked by the algorithm their own prefix names."""
    password, stored = SHA512_VECTORS[0]
    assert verify_password("{CRYPT}" + stored, password)
    assert verify_password(stored, password)
    assert verify_password(BCRYPT, "correct horse")
    assert verify_password(ARGON2ID, "correct horse")


@pytest.mark.parametrize(
    "stored",
    [
        "{MD5}1a1dc91c907325c69271ddf0c944bc72",  # unknown scheme
        "{CRYPT}abJnggxhB/yWI",  # DES crypt: too weak to keep
        "{CRYPT}$1$salt$hash",  # MD5 crypt: too weak to keep
        "plaintext-without-scheme",
        "{ARGON2ID}$argon2id$v=19$garbage",
        "{SHA512-CRYPT}$5$salt$hash",
        "{SHA512-CRYPT}$6$rounds=x$salt$hash",
        "{BLF-CRYPT}$2b$04$short",
    ],
)
def test_unusable_hashes_raise(stored: str) -> None:
    """A stored value that cannot be checked raises UnusableHashError instead of answering False."""
    with pytest.raises(UnusableHashError):
        verify_password(stored, "password")


def test_needs_rehash() -> None:
    """Only Argon2id with today's parameters is current; everything else wants a re-hash."""
    assert not needs_rehash(hash_password("x"))
    assert needs_rehash("{ARGON2ID}" + ARGON2ID)  # weaker parameters
    assert needs_rehash("{ARGON2I}" + ARGON2I)
    assert needs_rehash("{SHA512-CRYPT}" + SHA512_VECTORS[0][1])
    assert needs_rehash("{BLF-CRYPT}" + BCRYPT)
    assert needs_rehash("{PLAIN}x")
    assert needs_rehash("nonsense")
    assert needs_rehash("{ARGON2ID}$argon2id$garbage")


def test_split_scheme() -> None:
    """The scheme is read case-insensitively; the rest is returned untouched."""
    assert split_scheme("{sha512-crypt}$6$a$b") == ("SHA512-CRYPT", "$6$a$b")
    assert split_scheme("$6$a$b") == ("CRYPT", "$6$a$b")


def test_dummy_hash_is_made_once_and_checks_nothing_guessable() -> None:
    """The dummy hash is a current Argon2id hash, made once per process."""
    assert dummy_hash() is dummy_hash()
    assert not needs_rehash(dummy_hash())
    assert not verify_password(dummy_hash(), "")


@pytest.mark.parametrize(("stored", "scheme"), [
    (f"{{SHA512-CRYPT}}{SHA512_VECTORS[0][1]}", "SHA512-CRYPT"),
    (f"{{SHA256-CRYPT}}{SHA256_VECTORS[0][1]}", "SHA256-CRYPT"),
    (f"{{BLF-CRYPT}}{BCRYPT}", "BLF-CRYPT"),
    (f"{{ARGON2ID}}{ARGON2ID}", "ARGON2ID"),
    (f"{{argon2i}}{ARGON2I}", "ARGON2I"),
    (f"{{CRYPT}}{SHA512_VECTORS[0][1]}", "SHA512-CRYPT"),
    (BCRYPT, "BLF-CRYPT"),
    ("{PLAIN}secret", "PLAIN"),
])
def test_hash_scheme_names_what_verify_uses(stored: str, scheme: str) -> None:
    """hash_scheme names the scheme that checks a hash, {CRYPT} by its prefix, hashing nothing."""
    assert hash_scheme(stored) == scheme


@pytest.mark.parametrize("stored", [
    "{MD5}1a1dc91c907325c69271ddf0c944bc72", "{CRYPT}abJnggxhB/yWI", "{SHA512-CRYPT}$5$s$h",
    "{ARGON2ID}$argon2i$x", "{SHA256.HEX}abcd", "no-scheme", "{PLAIN}",
])
def test_hash_scheme_refuses_what_verify_cannot_check(stored: str) -> None:
    """Unknown schemes and hashes not of their scheme's form are refused before any import."""
    with pytest.raises(UnusableHashError):
        hash_scheme(stored)

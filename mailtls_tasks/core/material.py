"""Certificate material: parse, check, fingerprint, and build the exact file bytes.

Everything a deploy can refuse before touching the disk is refused here, with a
message that names the problem but never quotes key bytes. The checks mirror what
breaks mail in practice: a key that does not match the leaf silently disables
STARTTLS in Postfix and fails every Dovecot login; a missing or misordered chain
breaks strict clients; an older leaf sneaking back in is usually a pipeline bug.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from ..errors import MaterialError

MAX_INPUT_BYTES = 1024 * 1024
MIN_RSA_BITS = 2048

_PEM_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL
)
_KEY_LABELS = {b"PRIVATE KEY", b"RSA PRIVATE KEY", b"EC PRIVATE KEY"}


@dataclass(frozen=True, repr=False)
class Bundle:
    """A checked leaf, its chain (leaf's issuer first) and the matching private key.

    ``repr`` is deliberately opaque: a bundle must never end up in a log line.
    """

    leaf: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    key_pem: bytes

    def __repr__(self) -> str:
        return f"<Bundle leaf={self.fingerprint[:16]}… chain={len(self.chain)} key=<redacted>>"

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.leaf)

    @property
    def self_signed(self) -> bool:
        return _issued_by(self.leaf, self.leaf)

    def leaf_pem(self) -> bytes:
        return _pem(self.leaf)

    def chain_pem(self) -> bytes:
        return b"".join(_pem(c) for c in self.chain)

    def file_bytes(self, chain_path_set: bool) -> dict[str, bytes]:
        """role -> exact bytes. Without a chain_path the chain follows the leaf."""
        if chain_path_set:
            return {"cert": self.leaf_pem(), "chain": self.chain_pem(), "key": self.key_pem}
        return {"cert": self.leaf_pem() + self.chain_pem(), "key": self.key_pem}


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER, lowercase hex: what we compare on the wire."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def fingerprint_der(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _check_size(data: bytes, what: str) -> None:
    if len(data) > MAX_INPUT_BYTES:
        raise MaterialError(f"{what}: {len(data)} bytes is over the {MAX_INPUT_BYTES}-byte limit")
    if not data.strip():
        raise MaterialError(f"{what}: empty")


def _blocks(data: bytes, what: str) -> list[tuple[bytes, bytes]]:
    """(label, whole block) for every PEM block; anything else but whitespace is refused."""
    if b"-----BEGIN" not in data:
        if data[:1] == b"\x30":
            raise MaterialError(f"{what}: looks like DER; PEM is required")
        raise MaterialError(f"{what}: no PEM block found")
    blocks = [(m.group(1), m.group(0) + b"\n") for m in _PEM_BLOCK.finditer(data)]
    leftover = _PEM_BLOCK.sub(b"", data)
    if leftover.strip():
        raise MaterialError(f"{what}: unexpected data outside PEM blocks (truncated or trailing garbage?)")
    if not blocks:
        raise MaterialError(f"{what}: no complete PEM block found")
    return blocks


def parse_certs(data: bytes, what: str) -> list[x509.Certificate]:
    _check_size(data, what)
    certs = []
    for i, (label, block) in enumerate(_blocks(data, what)):
        if label in _KEY_LABELS or label.endswith(b"PRIVATE KEY"):
            raise MaterialError(f"{what}: block {i + 1} is a private key, not a certificate")
        if label != b"CERTIFICATE":
            raise MaterialError(f"{what}: block {i + 1} is {label.decode()!r}, not CERTIFICATE")
        try:
            certs.append(x509.load_pem_x509_certificate(block))
        except ValueError:
            raise MaterialError(f"{what}: certificate {i + 1} does not parse") from None
    return certs


def parse_key(data: bytes, what: str = "key") -> bytes:
    """Return the key as normalized PEM bytes (as given, one block, one newline)."""
    _check_size(data, what)
    blocks = _blocks(data, what)
    keys = [b for b in blocks if b[0].endswith(b"PRIVATE KEY")]
    if len(blocks) != 1 or len(keys) != 1:
        if any(b[0] == b"CERTIFICATE" for b in blocks):
            raise MaterialError(f"{what}: contains certificate blocks; give the private key alone")
        raise MaterialError(f"{what}: expected exactly one private key block, found {len(blocks)} blocks")
    label, block = keys[0]
    if label == b"ENCRYPTED PRIVATE KEY" or b"Proc-Type: 4,ENCRYPTED" in block:
        raise MaterialError(f"{what}: the private key is encrypted; daemons need an unencrypted key")
    try:
        serialization.load_pem_private_key(block, password=None)
    except TypeError:
        raise MaterialError(f"{what}: the private key is encrypted; daemons need an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise MaterialError(f"{what}: private key does not parse") from None
    return block


def _check_key_strength(pub: object, what: str) -> None:
    if isinstance(pub, rsa.RSAPublicKey) and pub.key_size < MIN_RSA_BITS:
        raise MaterialError(f"{what}: RSA key of {pub.key_size} bits is too weak (minimum {MIN_RSA_BITS})")
    if isinstance(pub, dsa.DSAPublicKey):
        raise MaterialError(f"{what}: DSA keys are not accepted for TLS servers")
    if isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.key_size < 256:
        raise MaterialError(f"{what}: EC curve {pub.curve.name} is too weak")
    if isinstance(pub, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return


def _not_before(c: x509.Certificate) -> dt.datetime:
    return c.not_valid_before_utc


def build_bundle(
    cert_pem: bytes,
    key_pem: bytes,
    chain_pem: bytes | None = None,
    *,
    now: dt.datetime | None = None,
) -> Bundle:
    """Parse and check the material; raise MaterialError naming what is wrong.

    A certificate can parse lazily and still hold an unparsable public key or
    extension; cryptography then raises ValueError deep inside a check. Those are
    bad input too, never an internal error (found by the property-based tests).
    """
    try:
        return _build_bundle(cert_pem, key_pem, chain_pem, now=now)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise MaterialError(f"cert: a certificate does not parse completely ({type(err).__name__}: {err})") from None


def _build_bundle(cert_pem: bytes, key_pem: bytes, chain_pem: bytes | None, *, now: dt.datetime | None) -> Bundle:
    now = now or dt.datetime.now(dt.UTC)
    certs = parse_certs(cert_pem, "cert")
    leaf, embedded_chain = certs[0], certs[1:]
    chain: Sequence[x509.Certificate] = embedded_chain
    if chain_pem is not None and chain_pem.strip():
        given = parse_certs(chain_pem, "chain")
        if embedded_chain and [fingerprint(c) for c in embedded_chain] != [fingerprint(c) for c in given]:
            raise MaterialError(
                "chain: the cert file already carries a chain (full chain) that differs from --chain"
            )
        chain = given
    key_block = parse_key(key_pem)

    key = serialization.load_pem_private_key(key_block, password=None)
    pub = leaf.public_key()
    _check_key_strength(pub, "cert")
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise MaterialError("key: the private key does not match the certificate's public key")

    _check_leaf_usage(leaf)
    if now < leaf.not_valid_before_utc:
        raise MaterialError(f"cert: not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%SZ}")
    if now > leaf.not_valid_after_utc:
        raise MaterialError(f"cert: expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}")

    ordered = [leaf, *chain]
    seen = {fingerprint(leaf)}
    for i in range(len(ordered) - 1):
        child, parent = ordered[i], ordered[i + 1]
        fp = fingerprint(parent)
        if fp in seen:
            raise MaterialError(f"chain: certificate {i + 1} appears twice")
        seen.add(fp)
        if not _issued_by(child, parent):
            what = "the leaf" if i == 0 else f"chain certificate {i}"
            raise MaterialError(
                f"chain: {what} is not issued by chain certificate {i + 1} "
                "(chain out of order or unrelated)"
            )
    return Bundle(leaf=leaf, chain=tuple(chain), key_pem=key_block)


def _check_leaf_usage(leaf: x509.Certificate) -> None:
    try:
        bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
        if bc.ca and not _issued_by(leaf, leaf):
            raise MaterialError("cert: the first certificate is a CA certificate, not a server leaf")
    except x509.ExtensionNotFound:
        pass
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.SERVER_AUTH not in eku and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku:
            raise MaterialError("cert: extendedKeyUsage does not allow serverAuth")
    except x509.ExtensionNotFound:
        pass


def leaf_of_file(data: bytes) -> x509.Certificate | None:
    """The first certificate of an on-disk cert file, or None if it has none / is unreadable."""
    m = _PEM_BLOCK.search(data)
    if not m or m.group(1) != b"CERTIFICATE":
        return None
    try:
        return x509.load_pem_x509_certificate(m.group(0))
    except ValueError:
        return None


def check_not_older(new: x509.Certificate, current: x509.Certificate | None, force: bool) -> None:
    if current is None or force:
        return
    if _not_before(new) < _not_before(current):
        raise MaterialError(
            f"cert: the new leaf (notBefore {_not_before(new):%Y-%m-%d %H:%M:%SZ}) is older than the "
            f"deployed one (notBefore {_not_before(current):%Y-%m-%d %H:%M:%SZ}); use --force to downgrade"
        )


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def key_matches_cert(key_pem: bytes, cert_pem: bytes) -> bool:
    """For recovery/diagnostics: does the key file on disk match the cert file's leaf?"""
    leaf = leaf_of_file(cert_pem)
    if leaf is None:
        return False
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return False
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(serialization.Encoding.DER, fmt) == leaf.public_key().public_bytes(
        serialization.Encoding.DER, fmt
    )

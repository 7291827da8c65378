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
import os
import re
import ssl
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from ..errors import MaterialError
from ..ids import MAX_INPUT_BYTES

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

    @property
    def key_type(self) -> str:
        """'rsa', 'ecdsa' or 'other' (Ed25519...): which certificate slot it fills."""
        pub = self.leaf.public_key()
        return "rsa" if isinstance(pub, rsa.RSAPublicKey) else "ecdsa" if isinstance(
            pub, ec.EllipticCurvePublicKey) else "other"

    def chain_fingerprints(self) -> list[str]:
        return [fingerprint(c) for c in self.chain]

    def spki_sha256(self) -> str:
        """SHA-256 of the leaf's SubjectPublicKeyInfo: what a DANE ``3 1 1`` record pins."""
        return spki_sha256(self.leaf.public_key())

    def leaf_pem(self) -> bytes:
        return _pem(self.leaf)

    def chain_pem(self) -> bytes:
        return b"".join(_pem(c) for c in self.chain)

    def file_bytes(self, chain_path_set: bool, combined: bool = False, prefix: str = "") -> dict[str, bytes]:
        """role -> exact bytes. Without a chain_path the chain follows the leaf; combined:
        one file, key first, then the leaf and its chain (Postfix's smtpd_tls_chain_files)."""
        if combined:
            return {prefix + "combined": self.key_pem + self.leaf_pem() + self.chain_pem()}
        if chain_path_set:
            return {prefix + "cert": self.leaf_pem(), prefix + "chain": self.chain_pem(), prefix + "key": self.key_pem}
        return {prefix + "cert": self.leaf_pem() + self.chain_pem(), prefix + "key": self.key_pem}


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


# What cryptography raises for a certificate it cannot read: a ValueError, except for a
# version field other than v1-v3, which raises InvalidVersion (an Exception of its own).
_UNPARSABLE = (ValueError, x509.InvalidVersion)


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
        except _UNPARSABLE:
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
        if given and fingerprint(given[0]) == fingerprint(leaf):
            given = given[1:]  # certbot's fullchain.pem given as --chain: the leaf, then the chain
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
            raise MaterialError(_chain_break(ordered, i))
    return Bundle(leaf=leaf, chain=tuple(chain), key_pem=key_block)


def _chain_break(ordered: Sequence[x509.Certificate], i: int) -> str:
    """Why ``ordered[i]`` is not followed by its issuer: given in the wrong place, or
    not given at all (certbot's root-only or cert-only files): the issuer it needs by
    name, and the file that has it."""
    what = "the leaf" if i == 0 else f"chain certificate {i}"
    child = ordered[i]
    elsewhere = [k for k, c in enumerate(ordered) if k != i + 1 and k != i and _issued_by(child, c)]
    if elsewhere:
        return (f"chain: {what} is issued by chain certificate {elsewhere[0]}, not by certificate {i + 1} that "
                "follows it: chain out of order (give it leaf first, each certificate followed by its issuer)")
    held = ", ".join(c.subject.rfc4514_string() or "(no subject)" for c in ordered[1:])
    return (f"chain: {what}'s issuer {child.issuer.rfc4514_string() or '(empty name)'} is missing; the chain "
            f"holds {held} (unrelated, or not the certificate that issued it). Give the chain with its issuer: "
            "certbot's fullchain.pem as --cert (or chain.pem as --chain), not cert.pem or a root alone")


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
    """The first certificate of an on-disk cert (or combined key + chain) file, or None."""
    m = next((m for m in _PEM_BLOCK.finditer(data) if m.group(1) == b"CERTIFICATE"), None)
    if m is None:
        return None
    try:
        return x509.load_pem_x509_certificate(m.group(0))
    except _UNPARSABLE:
        return None


def input_digest(certs: Sequence[bytes]) -> str:
    """What names the certificates a deploy was given, in any order (a dual target's
    two): SHA-256 over their input bytes."""
    h = hashlib.sha256()
    for c in sorted(certs):
        h.update(hashlib.sha256(c).digest())
    return h.hexdigest()


NO_CHAIN = "no chain (its certificate file would hold the leaf alone)"


def set_problems(cert_file: bytes, key_file: bytes, chain_file: bytes | None) -> set[str]:
    """What a daemon would find wrong with these files, as it loads them: a key that is
    not its certificate's, a chain file whose first certificate did not issue it, or
    (no chain file) a certificate file holding a CA-issued leaf alone."""
    leaf = leaf_of_file(cert_file)
    if leaf is None:
        return {"no certificate"}
    out = set()
    if not key_matches_cert(key_file, cert_file):
        out.add("a key that does not match its certificate")
    if chain_file is not None:
        first = leaf_of_file(chain_file)
        if first is None or not _issued_by(leaf, first):
            out.add("a chain that did not issue its certificate")
    elif leaf.issuer != leaf.subject and sum(m.group(1) == b"CERTIFICATE" for m in _PEM_BLOCK.finditer(cert_file)) == 1:
        out.add(NO_CHAIN)
    return out


def pem_blocks(data: bytes) -> list[bytes]:
    """Every PEM block, as written: what two files (or a file and a table's value)
    hold alike however they are joined."""
    return [m.group(0) for m in _PEM_BLOCK.finditer(data)]


def key_chains(data: bytes) -> list[bytes]:
    """Split key-first material (Postfix's chain files, an SNI table's value) into one
    PEM text per private key: the key, then the certificates that follow it."""
    groups: list[list[bytes]] = []
    for m in _PEM_BLOCK.finditer(data):
        if m.group(1).endswith(b"PRIVATE KEY") or not groups:
            groups.append([])
        groups[-1].append(m.group(0) + b"\n")
    return [b"".join(g) for g in groups]


def key_of_file(data: bytes) -> bytes | None:
    """The private key block of an on-disk key (or combined) file, or None."""
    m = next((m for m in _PEM_BLOCK.finditer(data) if m.group(1).endswith(b"PRIVATE KEY")), None)
    return m.group(0) if m else None


def check_not_older(new: x509.Certificate, current: x509.Certificate | None, force: bool) -> None:
    if current is None or force:
        return
    if _not_before(new) < _not_before(current):
        raise MaterialError(
            f"cert: the new leaf (notBefore {_not_before(new):%Y-%m-%d %H:%M:%SZ}) is older than the "
            f"deployed one (notBefore {_not_before(current):%Y-%m-%d %H:%M:%SZ}); use --force to downgrade"
        )


def check_path(bundle: Bundle, trust_anchors: str, *, allow_self_signed: bool,
               names: Sequence[str] = (), now: dt.datetime | None = None) -> None:
    """The chain must lead somewhere a client trusts.

    A leaf whose issuer is neither in the given chain nor a trust anchor is what breaks
    Thunderbird (and every strict client) while the fingerprint "verifies": refused,
    naming the missing issuer. ``strict`` (the target has ``trust_anchors``): the whole
    path must validate to them, for each of ``names``, as a client checking it would.
    """
    if bundle.self_signed and not bundle.chain:
        if not allow_self_signed:
            raise MaterialError("cert: the leaf is self-signed; set allow_self_signed = true on a target that means "
                                "it (a DANE-EE setup), or deploy a certificate from a CA")
        return
    if trust_anchors:
        from .names import validation_names

        anchors = load_anchors(trust_anchors)
        candidates = validation_names(tuple(names), bundle.leaf)
        if not candidates:
            raise MaterialError("cert: the leaf has no DNS subjectAltName, so no client can validate it for a name")
        for name in candidates:
            why = chain_problem(bundle.leaf, bundle.chain, name, anchors, now=now)
            if why:
                raise MaterialError(f"chain: does not validate to trust_anchors for {name}: {why}")
        return
    if bundle.chain:
        return  # the leaf's issuer is the first chain certificate (checked when the bundle was built)
    if any(a.subject == bundle.leaf.issuer and _issued_by(bundle.leaf, a) for a in system_anchors()):
        return  # issued directly by a trusted root
    raise MaterialError(f"chain: the leaf's issuer ({bundle.leaf.issuer.rfc4514_string()}) is neither in the chain "
                        "nor a trust anchor, so clients such as Thunderbird will refuse it: give the full chain "
                        "(certbot: fullchain.pem, not cert.pem)")


def chain_problem(leaf: x509.Certificate, intermediates: Sequence[x509.Certificate], name: str,
                  anchors: list[x509.Certificate], now: dt.datetime | None = None) -> str | None:
    """Why ``leaf`` with these intermediates does not validate to ``anchors`` for the
    concrete DNS ``name`` (as a mail client checking it would), or None if it does.
    (See names.validation_names: a wildcard name is checked through a label under it.)"""
    if not anchors:
        return "no trust anchors to validate against"
    builder = PolicyBuilder().store(Store(anchors))
    if now is not None:
        builder = builder.time(now)
    try:
        builder.build_server_verifier(x509.DNSName(name)).verify(leaf, list(intermediates))
    except VerificationError as err:
        return str(err).split(" (encountered", 1)[0]
    except ValueError as err:
        return str(err)
    return None


_SYSTEM_ANCHORS: list[x509.Certificate] | None = None


def system_anchors() -> list[x509.Certificate]:
    """The system trust store (Debian: /etc/ssl/certs/ca-certificates.crt)."""
    global _SYSTEM_ANCHORS
    if _SYSTEM_ANCHORS is None:
        paths = ssl.get_default_verify_paths()
        found: list[x509.Certificate] = []
        for path in (paths.cafile, paths.openssl_cafile, "/etc/ssl/certs/ca-certificates.crt"):
            if path and os.path.isfile(path):
                with open(path, "rb") as f, warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # a distribution's old root with a negative serial
                    found = x509.load_pem_x509_certificates(f.read())
                break
        _SYSTEM_ANCHORS = found
    return _SYSTEM_ANCHORS


def load_anchors(path: str) -> list[x509.Certificate]:
    """The certificates of a ``trust_anchors`` file (a private CA)."""
    try:
        with open(path, "rb") as f:
            return x509.load_pem_x509_certificates(f.read())
    except (OSError, *_UNPARSABLE) as err:
        raise MaterialError(f"trust_anchors: cannot read CA certificates from {path}: {err}") from None


def anchors_for(trust_anchors: str) -> list[x509.Certificate]:
    return load_anchors(trust_anchors) if trust_anchors else system_anchors()


def spki_sha256(public_key: object) -> str:
    der = public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def key_matches_cert(key_pem: bytes, cert_pem: bytes) -> bool:
    """For recovery/diagnostics: does the key file on disk match the cert file's leaf?"""
    leaf = leaf_of_file(cert_pem)
    key_block = key_of_file(key_pem)
    if leaf is None or key_block is None:
        return False
    try:
        key = serialization.load_pem_private_key(key_block, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return False
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(serialization.Encoding.DER, fmt) == leaf.public_key().public_bytes(
        serialization.Encoding.DER, fmt
    )

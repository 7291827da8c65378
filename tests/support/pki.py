"""A throwaway PKI for tests and the demo: CA -> intermediate -> leaves, RSA or ECDSA."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

UTC = dt.UTC
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def new_key(kind: str = "ec", bits: int = 2048) -> PrivateKey:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class Issued:
    cert: x509.Certificate
    key: PrivateKey
    chain: list[x509.Certificate] = field(default_factory=list)  # issuer first

    @property
    def cert_pem(self) -> bytes:
        return cert_pem(self.cert)

    @property
    def key_pem(self) -> bytes:
        return key_pem(self.key)

    @property
    def chain_pem(self) -> bytes:
        return b"".join(cert_pem(c) for c in self.chain)

    @property
    def fullchain_pem(self) -> bytes:
        return self.cert_pem + self.chain_pem

    @property
    def fingerprint(self) -> str:
        import hashlib

        return hashlib.sha256(self.cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def issue(
    cn: str,
    issuer: Issued | None = None,
    *,
    kind: str = "ec",
    bits: int = 2048,
    ca: bool = False,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    days: int = 30,
    eku: list[x509.ObjectIdentifier] | None = None,
    sans: list[str] | None = None,
    ips: list[str] | None = None,
    key: PrivateKey | None = None,
) -> Issued:
    key = key or new_key(kind, bits)
    nb = not_before or (dt.datetime.now(UTC) - dt.timedelta(minutes=5))
    na = not_after or (nb + dt.timedelta(days=days))
    signer_key = issuer.key if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer.cert.subject if issuer else _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(nb)
        .not_valid_after(na)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        # as every public CA issues them (and strict verifiers require them)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            (issuer.key if issuer else key).public_key()), critical=False)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage(eku if eku is not None else [ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        import ipaddress

        names: list[x509.GeneralName] = [x509.DNSName(s) for s in (sans or [cn])]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in (ips or [])]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(signer_key, hashes.SHA256())
    return Issued(cert, key, [])  # callers that want a chain set it (servers stop before the root)


@dataclass
class PKI:
    root: Issued
    inter: Issued

    def leaf(self, cn: str = "mail.example.test", **kw: object) -> Issued:
        """A leaf issued by the intermediate; its chain is [intermediate]."""
        leaf = issue(cn, self.inter, **kw)  # type: ignore[arg-type]
        leaf.chain = [self.inter.cert]
        return leaf


def make_pki(kind: str = "ec") -> PKI:
    root = issue("mailtls test root", kind=kind, ca=True, days=3650)
    inter = issue("mailtls test intermediate", root, kind=kind, ca=True, days=3650)
    inter.chain = [root.cert]
    return PKI(root, inter)

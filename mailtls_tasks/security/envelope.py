"""The deploy envelope: the bundle sealed for one host and signed by the pipeline.

Sealing: an ephemeral X25519 key agrees a secret with the target host's public key;
HKDF-SHA256 turns it into a ChaCha20-Poly1305 key; the header (version, target, host,
deploy id, fence, issue time, force flag, signer, recipient) is the AEAD's associated
data, so it cannot be changed without the decryption failing. The pipeline's Ed25519
key signs the header and ciphertext together.

Opening checks, in order, and refuses with a message naming the reason:
signer trusted -> signature valid -> header matches the message (target, host, deploy
id, fence: an envelope cannot be replayed to another target or under another deploy)
-> issued within ``max_age`` (an old envelope cannot be used later to roll a target
back) -> recipient is one of our host keys -> decrypts -> a well-formed bundle.
Fence and deploy id replays are then stopped by the host journal (core.steps.stage), which
uses the fence from this signed header only: a message's own ``fence`` field, if any,
must agree with it and is otherwise ignored.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import Rejected
from ..ids import MAX_INPUT_BYTES
from .keys import encode_public, key_id

VERSION = 1
MAX_CLOCK_SKEW = 300.0
MAX_ENVELOPE_BYTES = 4 * MAX_INPUT_BYTES
_HEADER_FIELDS = ("v", "target", "host", "deploy_id", "fence", "issued_at", "force", "signer", "recipient", "epk")
_INFO = b"mailtls envelope v1"


class EnvelopeError(Rejected):
    """The envelope was refused; nothing was decrypted into a step, nothing touched."""


@dataclass(frozen=True, repr=False)
class OpenedBundle:
    cert: bytes
    key: bytes
    chain: bytes | None
    force: bool
    fence: int  # from the signed header: the only fence a host acts on
    also: tuple[tuple[bytes, bytes, bytes | None], ...] = ()  # a dual target's second certificate

    def __repr__(self) -> str:
        return "<OpenedBundle key=<redacted>>"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(value: Any, name: str) -> bytes:
    if not isinstance(value, str):
        raise EnvelopeError(f"envelope: {name} missing or not a string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise EnvelopeError(f"envelope: {name} is not valid base64") from None


def _canonical(header: dict[str, Any]) -> bytes:
    return json.dumps({k: header[k] for k in _HEADER_FIELDS}, sort_keys=True, separators=(",", ":")).encode()


def _kdf(shared: bytes, epk: bytes, recipient: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=epk + recipient, info=_INFO).derive(shared)


def seal(*, target: str, host: str, deploy_id: str, fence: int, cert: bytes, key: bytes, chain: bytes | None,
         force: bool, signing_key: Ed25519PrivateKey, recipient: X25519PublicKey,
         issued_at: float | None = None,
         also: list[tuple[bytes, bytes, bytes | None]] | None = None) -> dict[str, Any]:
    eph = X25519PrivateKey.generate()
    epk = eph.public_key().public_bytes_raw()
    header: dict[str, Any] = {
        "v": VERSION, "target": target, "host": host, "deploy_id": deploy_id, "fence": fence,
        "issued_at": round(time.time() if issued_at is None else issued_at, 3), "force": bool(force),
        "signer": encode_public(signing_key.public_key()),
        "recipient": key_id(encode_public(recipient)), "epk": _b64(epk),
    }
    aad = _canonical(header)
    aead_key = _kdf(eph.exchange(recipient), epk, recipient.public_bytes_raw())
    nonce = os.urandom(12)
    body: dict[str, Any] = {"cert": _b64(cert), "key": _b64(key), "chain": _b64(chain) if chain else None}
    if also:
        body["also"] = [{"cert": _b64(c), "key": _b64(k), "chain": _b64(ch) if ch else None} for c, k, ch in also]
    plain = json.dumps(body).encode()
    ct = ChaCha20Poly1305(aead_key).encrypt(nonce, plain, aad)
    sig = signing_key.sign(aad + nonce + ct)
    return {**header, "nonce": _b64(nonce), "ct": _b64(ct), "sig": _b64(sig)}


def open_envelope(env: Any, *, target: str, host: str, deploy_id: str, fence: int | None = None,
                  host_keys: list[X25519PrivateKey], trusted: list[Ed25519PublicKey], max_age: float,
                  now: float | None = None) -> OpenedBundle:
    if not isinstance(env, dict):
        raise EnvelopeError("envelope: missing or not an object")
    if len(json.dumps(env, default=str)) > MAX_ENVELOPE_BYTES:
        raise EnvelopeError("envelope: too large")
    missing = [k for k in (*_HEADER_FIELDS, "nonce", "ct", "sig") if k not in env]
    if missing:
        raise EnvelopeError(f"envelope: missing fields {missing}")
    if env["v"] != VERSION:
        raise EnvelopeError(f"envelope: unsupported version {env['v']!r}")
    header = {k: env[k] for k in _HEADER_FIELDS}
    try:
        aad = _canonical(header)
    except (TypeError, ValueError):
        raise EnvelopeError("envelope: malformed header") from None
    nonce, ct, sig = _unb64(env["nonce"], "nonce"), _unb64(env["ct"], "ct"), _unb64(env["sig"], "sig")

    signer = next((k for k in trusted if encode_public(k) == env["signer"]), None)
    if signer is None:
        shown = str(env["signer"])[:24]
        raise EnvelopeError(f"envelope: signed by {shown}…, which is not in this host's trusted_signers")
    try:
        signer.verify(sig, aad + nonce + ct)
    except InvalidSignature:
        raise EnvelopeError("envelope: signature does not verify (forged or tampered)") from None

    for name, want in (("target", target), ("host", host), ("deploy_id", deploy_id)):
        if env[name] != want:
            raise EnvelopeError(f"envelope: made for {name} {env[name]!r}, but the message is for {want!r}")
    if isinstance(env["fence"], bool) or not isinstance(env["fence"], int) or env["fence"] < 0:
        raise EnvelopeError("envelope: fence is not a non-negative integer")
    if fence is not None and env["fence"] != fence:
        raise EnvelopeError(f"envelope: made for fence {env['fence']!r}, but the message carries {fence!r}")
    if not isinstance(env["issued_at"], int | float):
        raise EnvelopeError("envelope: issued_at is not a time")
    age = (time.time() if now is None else now) - float(env["issued_at"])
    if age > max_age:
        raise EnvelopeError(f"envelope: issued {age:.0f}s ago, older than the {max_age:.0f}s allowed "
                            "(expired, or replayed)")
    if age < -MAX_CLOCK_SKEW:
        raise EnvelopeError("envelope: issued in the future (check the clocks)")

    mine = next((k for k in host_keys if key_id(encode_public(k.public_key())) == env["recipient"]), None)
    if mine is None:
        raise EnvelopeError("envelope: sealed for another host key (recipient not among this host's host_keys)")
    epk = _unb64(env["epk"], "epk")
    if len(epk) != 32:
        raise EnvelopeError("envelope: bad ephemeral key")
    try:
        shared = mine.exchange(X25519PublicKey.from_public_bytes(epk))
        plain = ChaCha20Poly1305(_kdf(shared, epk, mine.public_key().public_bytes_raw())).decrypt(nonce, ct, aad)
        body = json.loads(plain)
    except (InvalidTag, ValueError):
        raise EnvelopeError("envelope: does not decrypt (tampered, or sealed for another key)") from None
    if not isinstance(body, dict):
        raise EnvelopeError("envelope: malformed bundle")
    chain = body.get("chain")
    extra = body.get("also") or []
    if not isinstance(extra, list) or len(extra) > 1 or not all(isinstance(b, dict) for b in extra):
        raise EnvelopeError("envelope: malformed bundle (also)")
    also = tuple((_unb64(b.get("cert"), "bundle also cert"), _unb64(b.get("key"), "bundle also key"),
                  None if b.get("chain") is None else _unb64(b.get("chain"), "bundle also chain")) for b in extra)
    return OpenedBundle(cert=_unb64(body.get("cert"), "bundle cert"), key=_unb64(body.get("key"), "bundle key"),
                        chain=None if chain is None else _unb64(chain, "bundle chain"), force=bool(env["force"]),
                        fence=int(env["fence"]), also=also)

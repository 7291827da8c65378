from __future__ import annotations

import base64
import copy
import json
import time
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailtls_tasks.core.material import build_bundle
from mailtls_tasks.errors import MailTLSError, MaterialError
from mailtls_tasks.security.envelope import EnvelopeError, open_envelope, seal
from tests.support.pki import PKI

SIGNER = Ed25519PrivateKey.generate()
HOST = X25519PrivateKey.generate()
REFS = {"target": "smtp", "host": "mx1", "deploy_id": "d-1", "fence": 7}


def sealed(pki: PKI, **over: Any) -> tuple[dict[str, Any], bytes]:
    leaf = pki.leaf()
    args: dict[str, Any] = {**REFS, "cert": leaf.fullchain_pem, "key": leaf.key_pem, "chain": None, "force": False,
                            "signing_key": SIGNER, "recipient": HOST.public_key()}
    args.update(over)
    return seal(**args), leaf.key_pem


def opened(env: Any, **over: Any) -> Any:
    kw: dict[str, Any] = {**REFS, "host_keys": [HOST], "trusted": [SIGNER.public_key()], "max_age": 3600}
    kw.update(over)
    return open_envelope(env, **kw)


def test_round_trip_and_no_cleartext(pki: PKI) -> None:
    env, key = sealed(pki)
    text = json.dumps(env)
    body = [ln for ln in key.decode().splitlines() if "-----" not in ln]
    assert not any(line in text for line in body)
    assert base64.b64encode(key).decode()[:40] not in text
    assert opened(env).key == key
    assert "redacted" in repr(opened(env))


def test_forged_by_untrusted_key(pki: PKI) -> None:
    env, _ = sealed(pki, signing_key=Ed25519PrivateKey.generate())
    with pytest.raises(EnvelopeError, match="not in this host's trusted_signers"):
        opened(env)


def test_forged_signer_field_swapped(pki: PKI) -> None:
    env, _ = sealed(pki, signing_key=Ed25519PrivateKey.generate())
    from mailtls_tasks.security.keys import encode_public

    env["signer"] = encode_public(SIGNER.public_key())  # claims the trusted key, signed by another
    with pytest.raises(EnvelopeError, match="signature does not verify"):
        opened(env)


@pytest.mark.parametrize("field", ["ct", "nonce", "epk", "target", "fence", "issued_at", "force", "recipient"])
def test_tampered(pki: PKI, field: str) -> None:
    env, _ = sealed(pki)
    bad = copy.deepcopy(env)
    v = bad[field]
    if isinstance(v, bool):
        bad[field] = not v
    elif isinstance(v, int | float):
        bad[field] = v + 1
    elif field in ("ct", "nonce", "epk"):
        raw = bytearray(base64.b64decode(v))
        raw[0] ^= 1
        bad[field] = base64.b64encode(bytes(raw)).decode()
    else:
        bad[field] = v + "x"
    with pytest.raises(EnvelopeError, match="signature does not verify"):
        opened(bad)


def test_wrong_target_host_deploy_or_fence(pki: PKI) -> None:
    env, _ = sealed(pki)
    with pytest.raises(EnvelopeError, match="made for target 'smtp'"):
        opened(env, target="imap")
    with pytest.raises(EnvelopeError, match="made for host 'mx1'"):
        opened(env, host="mx2")
    with pytest.raises(EnvelopeError, match="made for deploy_id"):
        opened(env, deploy_id="d-2")
    with pytest.raises(EnvelopeError, match="made for fence 7"):
        opened(env, fence=8)


def test_expired_and_future(pki: PKI) -> None:
    env, _ = sealed(pki, issued_at=time.time() - 7200)
    with pytest.raises(EnvelopeError, match="older than the 3600s allowed"):
        opened(env)
    env, _ = sealed(pki, issued_at=time.time() + 3600)
    with pytest.raises(EnvelopeError, match="in the future"):
        opened(env)


def test_sealed_for_another_host_key(pki: PKI) -> None:
    env, _ = sealed(pki, recipient=X25519PrivateKey.generate().public_key())
    with pytest.raises(EnvelopeError, match="sealed for another host key"):
        opened(env)


def test_missing_fields_and_garbage() -> None:
    for bad in (None, [], "x", {}, {"v": 1}, {"v": 2, **dict.fromkeys(
            ["target", "host", "deploy_id", "fence", "issued_at", "force", "signer", "recipient", "epk", "nonce",
             "ct", "sig"], "x")}):
        with pytest.raises(EnvelopeError):
            opened(bad)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=6),
                           max_leaves=20)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["v", "target", "host", "deploy_id", "fence", "issued_at", "force", "signer",
                                        "recipient", "epk", "nonce", "ct", "sig", "extra"]), json_values))
def test_envelope_opener_only_ever_raises_envelope_error(env: dict[str, Any]) -> None:
    try:
        opened(env)
    except EnvelopeError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=4096), st.binary(max_size=512))
def test_bundle_parser_only_ever_raises_material_error(cert: bytes, key: bytes) -> None:
    try:
        build_bundle(cert, key)
    except MaterialError:
        pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_bundle_parser_on_mangled_real_pem(pki: PKI, data: st.DataObject) -> None:
    leaf = PKI_CACHE.setdefault("leaf", pki.leaf())  # fixed: the draws must replay identically
    raw = bytearray(leaf.fullchain_pem)
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    try:
        b = build_bundle(bytes(raw), leaf.key_pem)
    except MailTLSError:
        return
    assert b.fingerprint  # a mangled-but-valid input must still be a consistent bundle


PKI_CACHE: dict[str, Any] = {}

from __future__ import annotations

import datetime as dt

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from mailtls_tasks.core.material import build_bundle, check_not_older
from mailtls_tasks.errors import MaterialError
from mailtls_tasks.ids import MAX_INPUT_BYTES
from tests.support.pki import PKI, issue, new_key

UTC = dt.UTC


def test_good_bundle_and_file_bytes(pki: PKI) -> None:
    leaf = pki.leaf()
    b = build_bundle(leaf.cert_pem, leaf.key_pem, leaf.chain_pem)
    assert b.fingerprint == leaf.fingerprint
    appended = b.file_bytes(chain_path_set=False)
    assert appended["cert"] == leaf.cert_pem + pki.inter.cert_pem
    separate = b.file_bytes(chain_path_set=True)
    assert separate["cert"] == leaf.cert_pem and separate["chain"] == pki.inter.cert_pem
    assert "redacted" in repr(b) and b"PRIVATE" not in repr(b).encode()


def test_fullchain_as_cert(pki: PKI) -> None:
    leaf = pki.leaf()
    b = build_bundle(leaf.fullchain_pem, leaf.key_pem)
    assert len(b.chain) == 1
    assert build_bundle(leaf.fullchain_pem, leaf.key_pem, leaf.chain_pem).chain == b.chain
    other = pki.leaf("other")
    with pytest.raises(MaterialError, match="differs from --chain"):
        build_bundle(leaf.fullchain_pem, leaf.key_pem, other.cert_pem)


def test_key_mismatch(pki: PKI) -> None:
    a, b = pki.leaf(), pki.leaf()
    with pytest.raises(MaterialError, match="does not match"):
        build_bundle(a.cert_pem, b.key_pem, a.chain_pem)


def test_expired_and_not_yet_valid(pki: PKI) -> None:
    now = dt.datetime.now(UTC)
    old = pki.leaf(not_before=now - dt.timedelta(days=40), not_after=now - dt.timedelta(days=1))
    with pytest.raises(MaterialError, match="expired"):
        build_bundle(old.cert_pem, old.key_pem, old.chain_pem)
    future = pki.leaf(not_before=now + dt.timedelta(days=1))
    with pytest.raises(MaterialError, match="not valid before"):
        build_bundle(future.cert_pem, future.key_pem, future.chain_pem)


def test_chain_out_of_order_or_unrelated(pki: PKI) -> None:
    leaf = pki.leaf()
    with pytest.raises(MaterialError, match=r"issued by chain certificate 2, not by certificate 1 .*out of order"):
        build_bundle(leaf.cert_pem, leaf.key_pem, pki.root.cert_pem + pki.inter.cert_pem)
    other = issue("unrelated ca", ca=True)
    with pytest.raises(MaterialError, match="issuer CN=mailtls test intermediate is missing; the chain holds "
                                            "CN=unrelated ca"):
        build_bundle(leaf.cert_pem, leaf.key_pem, other.cert_pem)
    with pytest.raises(MaterialError, match=r"holds CN=mailtls test root .*fullchain\.pem as --cert"):
        build_bundle(leaf.cert_pem, leaf.key_pem, pki.root.cert_pem)  # a root alone: the intermediate named
    with pytest.raises(MaterialError, match="chain certificate 1's issuer CN=mailtls test root is missing"):
        build_bundle(leaf.cert_pem, leaf.key_pem, pki.inter.cert_pem + other.cert_pem)
    # in order, with the root: accepted
    assert len(build_bundle(leaf.cert_pem, leaf.key_pem, pki.inter.cert_pem + pki.root.cert_pem).chain) == 2


def test_older_leaf_refused_unless_forced(pki: PKI) -> None:
    now = dt.datetime.now(UTC)
    newer = pki.leaf(not_before=now - dt.timedelta(hours=1))
    older = pki.leaf(not_before=now - dt.timedelta(days=2))
    with pytest.raises(MaterialError, match="older than the deployed one"):
        check_not_older(older.cert, newer.cert, force=False)
    check_not_older(older.cert, newer.cert, force=True)
    check_not_older(newer.cert, older.cert, force=False)


@pytest.mark.parametrize("data,match", [
    (b"", "empty"),
    (b"hello", "no PEM block"),
    (b"\x30\x82\x01\x00garbage", "DER"),
    (b"-----BEGIN CERTIFICATE-----\nMIIB\n", "no complete PEM block|outside PEM"),
    (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "does not parse"),
    (b"x" * (MAX_INPUT_BYTES + 1), "limit"),
])
def test_garbage_cert(pki: PKI, data: bytes, match: str) -> None:
    leaf = pki.leaf()
    with pytest.raises(MaterialError, match=match):
        build_bundle(data, leaf.key_pem)


def test_trailing_garbage_and_key_problems(pki: PKI) -> None:
    leaf = pki.leaf()
    with pytest.raises(MaterialError, match="outside PEM"):
        build_bundle(leaf.cert_pem + b"junk", leaf.key_pem)
    with pytest.raises(MaterialError, match="exactly one private key"):
        build_bundle(leaf.cert_pem, leaf.key_pem + pki.leaf().key_pem)
    enc = leaf.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.BestAvailableEncryption(b"pw"))
    with pytest.raises(MaterialError, match="encrypted"):
        build_bundle(leaf.cert_pem, enc)
    with pytest.raises(MaterialError, match="private key, not a certificate"):
        build_bundle(leaf.key_pem, leaf.key_pem)


def test_error_messages_never_contain_key_material(pki: PKI) -> None:
    leaf, other = pki.leaf(), pki.leaf()
    key_lines = [ln for ln in leaf.key_pem.decode().splitlines() if "-----" not in ln]
    for cert, key in [(other.cert_pem, leaf.key_pem), (leaf.cert_pem, leaf.key_pem + b"x")]:
        with pytest.raises(MaterialError) as err:
            build_bundle(cert, key)
        assert not any(line in str(err.value) for line in key_lines)


def test_ca_as_leaf_no_server_auth_weak_rsa(pki: PKI) -> None:
    with pytest.raises(MaterialError, match="CA certificate"):
        build_bundle(pki.inter.cert_pem, pki.inter.key_pem, pki.root.cert_pem)
    client_only = pki.leaf(eku=[ExtendedKeyUsageOID.CLIENT_AUTH])
    with pytest.raises(MaterialError, match="serverAuth"):
        build_bundle(client_only.cert_pem, client_only.key_pem, client_only.chain_pem)
    weak = pki.leaf(key=new_key("rsa", 1024))
    with pytest.raises(MaterialError, match="too weak"):
        build_bundle(weak.cert_pem, weak.key_pem, weak.chain_pem)


def test_a_certificate_with_an_invalid_x509_version_is_rejected_not_a_crash(pki: PKI) -> None:
    """cryptography raises InvalidVersion (not a ValueError) for a version field of 6:
    found by the hypothesis fuzzing of mangled PEM. It must be a MaterialError naming
    the certificate, like any other unparsable one, and an on-disk leaf reads as none."""
    import base64

    from mailtls_tasks.core.material import leaf_of_file

    leaf = pki.leaf()
    der = leaf.cert.public_bytes(serialization.Encoding.DER)
    assert b"\xa0\x03\x02\x01\x02" in der  # [0] EXPLICIT INTEGER 2: X.509 v3
    bad_der = der.replace(b"\xa0\x03\x02\x01\x02", b"\xa0\x03\x02\x01\x06", 1)
    b64 = base64.encodebytes(bad_der).replace(b"\n", b"")
    bad = b"-----BEGIN CERTIFICATE-----\n" + b"\n".join(b64[i:i + 64] for i in range(0, len(b64), 64)) \
        + b"\n-----END CERTIFICATE-----\n"
    with pytest.raises(MaterialError, match="certificate 1 does not parse"):
        build_bundle(bad, leaf.key_pem, None)
    assert leaf_of_file(bad) is None

"""DNS names a certificate covers, as a TLS client checks them (RFC 6125).

Used twice: at stage, a bundle whose leaf does not cover every name a target must
serve is ``rejected`` (a certbot hook installed for every lineage must not put
``www.example.com``'s certificate on the mail server); and a rollout ``--covers``
selects the targets whose names the new certificate covers.
"""

from __future__ import annotations

from cryptography import x509


def leaf_names(leaf: x509.Certificate) -> list[str]:
    """The leaf's DNS subjectAltNames, lower-case (clients ignore the CN when SANs exist)."""
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [n.lower().rstrip(".") for n in san.get_values_for_type(x509.DNSName)]


def name_covered(name: str, sans: list[str]) -> bool:
    """``name`` matches a SAN exactly, or a ``*.`` wildcard standing for one whole label."""
    name = name.lower().rstrip(".")
    for san in sans:
        if san == name:
            return True
        if san.startswith("*.") and "." in name:
            label, _, rest = name.partition(".")
            if label and rest == san[2:]:
                return True
    return False


def uncovered(names: list[str] | tuple[str, ...], leaf: x509.Certificate) -> list[str]:
    """The names ``leaf`` does not cover (empty: it covers them all)."""
    sans = leaf_names(leaf)
    return [n for n in names if not name_covered(n, sans)]


PROBE_LABEL = "mailtls-check"


def validation_names(names: list[str] | tuple[str, ...], leaf: x509.Certificate) -> list[str]:
    """The concrete DNS names to validate a served or staged chain for, as a client
    would: the target's ``names``, else the leaf's first SAN; a wildcard stands for a
    concrete label under it (``*.example.com`` -> ``mailtls-check.example.com``).
    Empty only for a leaf with no DNS name at all."""
    chosen = list(names) or leaf_names(leaf)[:1]
    return [f"{PROBE_LABEL}.{n[2:]}" if n.startswith("*.") else n for n in chosen]

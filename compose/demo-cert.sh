#!/bin/sh
# demo-cert OUT_DIR [DNSNAME...] -- a fresh certificate from the compose demo's private CA,
# laid out as certbot leaves one:
#   OUT_DIR/fullchain.pem   the leaf, then the intermediate
#   OUT_DIR/privkey.pem     its key (0600)
# DNSNAME defaults to mail.compose.test (the name compose/targets.toml verifies against).
# The CA (root -> intermediate, ECDSA P-256) is made on first use in $DEMO_CA_DIR
# (default /keys/ca); demo-ca.pem there is the root the targets trust (trust_anchors).
# DEMO ONLY: the CA keys sit unencrypted beside it. A real pipeline gets its
# certificates from certbot, acme.sh, step, Vault ...
set -eu

if [ "$#" -lt 1 ]; then
    echo "usage: demo-cert OUT_DIR [DNSNAME...]" >&2
    exit 2
fi
out=$1
shift
[ "$#" -gt 0 ] || set -- mail.compose.test
ca=${DEMO_CA_DIR:-/keys/ca}
umask 077

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# new_key FILE: an ECDSA P-256 key
new_key() {
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"
}

# sign CSR ISSUER_CERT ISSUER_KEY DAYS EXTFILE OUT
sign() {
    openssl x509 -req -in "$1" -CA "$2" -CAkey "$3" -days "$4" -extfile "$5" \
        -set_serial "0x$(openssl rand -hex 16)" -out "$6" 2>/dev/null
}

if [ ! -s "$ca/demo-ca.pem" ] || [ ! -s "$ca/demo-intermediate.pem" ]; then
    mkdir -p "$ca"
    new_key "$ca/demo-ca.key"
    openssl req -x509 -new -key "$ca/demo-ca.key" -days 3650 -subj "/CN=mailtls compose demo root CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectKeyIdentifier=hash" -out "$tmp/root.pem"
    new_key "$ca/demo-intermediate.key"
    openssl req -new -key "$ca/demo-intermediate.key" -subj "/CN=mailtls compose demo intermediate" \
        -out "$tmp/inter.csr"
    printf '%s\n' "basicConstraints=critical,CA:TRUE,pathlen:0" "keyUsage=critical,keyCertSign,cRLSign" \
        "subjectKeyIdentifier=hash" "authorityKeyIdentifier=keyid:always" > "$tmp/inter.ext"
    sign "$tmp/inter.csr" "$tmp/root.pem" "$ca/demo-ca.key" 1825 "$tmp/inter.ext" "$tmp/inter.pem"
    chmod 0644 "$tmp/root.pem" "$tmp/inter.pem"
    mv "$tmp/inter.pem" "$ca/demo-intermediate.pem"
    mv "$tmp/root.pem" "$ca/demo-ca.pem"
fi

san=""
for name in "$@"; do
    san="${san:+$san,}DNS:$name"
done
new_key "$tmp/privkey.pem"
openssl req -new -key "$tmp/privkey.pem" -subj "/CN=$1" -out "$tmp/leaf.csr"
printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth" "subjectKeyIdentifier=hash" "authorityKeyIdentifier=keyid:always" \
    "subjectAltName=$san" > "$tmp/leaf.ext"
sign "$tmp/leaf.csr" "$ca/demo-intermediate.pem" "$ca/demo-intermediate.key" 90 "$tmp/leaf.ext" "$tmp/leaf.pem"
cat "$tmp/leaf.pem" "$ca/demo-intermediate.pem" > "$tmp/fullchain.pem"
chmod 0644 "$tmp/fullchain.pem"
mkdir -p "$out"
mv "$tmp/privkey.pem" "$out/privkey.pem"
mv "$tmp/fullchain.pem" "$out/fullchain.pem"
echo "$out/fullchain.pem $out/privkey.pem: $(openssl x509 -in "$out/fullchain.pem" -noout -subject -enddate | tr '\n' ' ')"

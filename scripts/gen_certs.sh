#!/usr/bin/env bash
# Local TLS material for a fedmerge federation (docker/compose.tls.yaml, or native Flower processes):
#   ca.crt / ca.key           a private certificate authority (ca.key never leaves this folder)
#   server.pem / server.key   the SuperLink's certificate, signed by the CA, SANs: superlink, localhost,
#                             127.0.0.1 (+ EXTRA_SANS, e.g. EXTRA_SANS="DNS:link.example.org,IP:10.0.0.5")
#   supernode_<i> (+ .pub)    N SuperNode authentication key pairs (ECDSA P-384, OpenSSH format, which is
#                             what flower-supernode --auth-supernode-private-key and
#                             `flwr supernode register <key.pub>` read)
#
#   bash scripts/gen_certs.sh [OUT_DIR=docker/certs] [NUM_SUPERNODES=2]
#
# Environment: EXTRA_SANS, DAYS (825), KEY_BITS (3072), PYTHON (python3).
# Idempotent: existing files are kept; a server certificate that no longer verifies against the CA (or lacks
# a requested SAN) is re-issued. Needs bash + openssl; SuperNode keys use ssh-keygen, or, without it,
# openssl + Python with the `cryptography` package (a Flower dependency; PYTHON=... selects the interpreter).
# ca.key is mode 0600; server.key and the SuperNode private keys are 0640 (`group_add` in compose.tls.yaml and
# compose.auth.yaml lets the container user read them through your group, see docker/README.md). The output folder is git-ignored; never commit it.
set -euo pipefail

OUT="${1:-docker/certs}"
N="${2:-2}"
DAYS="${DAYS:-825}"
KEY_BITS="${KEY_BITS:-3072}"  # RSA size of the CA and SuperLink keys
PYTHON="${PYTHON:-python3}"
[[ "$PYTHON" == */* && "$PYTHON" != /* ]] && PYTHON="$PWD/$PYTHON"  # still valid after the cd below
SANS="DNS:superlink,DNS:localhost,IP:127.0.0.1${EXTRA_SANS:+,$EXTRA_SANS}"

die() { echo "gen_certs.sh: $*" >&2; exit 1; }
command -v openssl >/dev/null || die "openssl is required"
[[ "$N" =~ ^[0-9]+$ ]] || die "NUM_SUPERNODES must be a non-negative integer, got '$N'"

mkdir -p "$OUT"
cd "$OUT"
umask 077  # everything created from here on is private until the chmods at the end

# --- certificate authority -------------------------------------------------------------------------------
if [[ ! -s ca.key || ! -s ca.crt ]]; then
  rm -f ca.key ca.crt ca.srl server.pem
  openssl req -x509 -newkey "rsa:$KEY_BITS" -nodes -sha256 -days "$DAYS" -subj "/CN=fedmerge local CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout ca.key -out ca.crt 2>/dev/null
  echo "created CA            $OUT/ca.crt"
fi

# --- SuperLink certificate -------------------------------------------------------------------------------
server_ok() {
  [[ -s server.pem && -s server.key ]] || return 1
  openssl verify -CAfile ca.crt server.pem >/dev/null 2>&1 || return 1
  local have want
  have="$(openssl x509 -in server.pem -noout -text 2>/dev/null | tr -d ' ')"
  for want in ${SANS//,/ }; do
    want="${want/IP:/IPAddress:}"
    [[ "$have" == *"$want"* ]] || return 1
  done
  # the key must belong to the certificate
  [[ "$(openssl x509 -in server.pem -noout -pubkey)" == "$(openssl pkey -in server.key -pubout 2>/dev/null)" ]]
}
if ! server_ok; then
  cat > server.cnf <<CNF
[req]
distinguished_name = dn
prompt = no
[dn]
CN = superlink
[ext]
subjectAltName = $SANS
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
CNF
  openssl req -new -newkey "rsa:$KEY_BITS" -nodes -sha256 -keyout server.key -out server.csr -config server.cnf \
    2>/dev/null
  openssl x509 -req -sha256 -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days "$DAYS" \
    -extfile server.cnf -extensions ext -out server.pem 2>/dev/null
  rm -f server.csr server.cnf
  openssl verify -CAfile ca.crt server.pem >/dev/null || die "server.pem does not verify against ca.crt"
  echo "created SuperLink cert $OUT/server.pem ($SANS)"
fi

# --- SuperNode authentication keys -----------------------------------------------------------------------
openssh_from_openssl() {  # $1: output basename; P-384 key made by openssl, written in OpenSSH format
  "$PYTHON" - "$1" <<'PY' || die "need ssh-keygen, or $PYTHON with the 'cryptography' package"
import subprocess, sys
from cryptography.hazmat.primitives import serialization as s
name = sys.argv[1]
pem = subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"],
                     check=True, capture_output=True).stdout
key = s.load_pem_private_key(pem, None)
with open(name, "wb") as f:
    f.write(key.private_bytes(s.Encoding.PEM, s.PrivateFormat.OpenSSH, s.NoEncryption()))
with open(name + ".pub", "wb") as f:
    f.write(key.public_key().public_bytes(s.Encoding.OpenSSH, s.PublicFormat.OpenSSH) + b" " + name.encode() + b"\n")
PY
}
for ((i = 0; i < N; i++)); do
  key="supernode_$i"
  [[ -s "$key" && -s "$key.pub" ]] && continue
  rm -f "$key" "$key.pub"
  if command -v ssh-keygen >/dev/null && [[ -z "${GEN_CERTS_NO_SSH_KEYGEN:-}" ]]; then
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "$key" -f "$key"
  else
    openssh_from_openssl "$key"
  fi
  echo "created SuperNode key  $OUT/$key (+ .pub)"
done

chmod 600 ca.key
chmod 640 server.key
chmod 644 ca.crt server.pem
for f in supernode_*; do
  [[ -e "$f" ]] || continue
  if [[ "$f" == *.pub ]]; then chmod 644 "$f"; else chmod 640 "$f"; fi  # read in containers via CERTS_GID
done
echo "certificates in $(pwd) (register SuperNode keys with: flwr supernode register <supernode_i.pub> <connection>)"

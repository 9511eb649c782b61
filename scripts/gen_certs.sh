#!/usr/bin/env bash
# Generate a local CA, a SuperLink TLS certificate (SANs: superlink, localhost, 127.0.0.1) and N SuperNode
# authentication key pairs (ECDSA P-384, OpenSSH format, as Flower expects). Secrets stay on this machine:
# the output folder is git-ignored.
#   bash scripts/gen_certs.sh [OUT_DIR=docker/certs] [NUM_SUPERNODES=2]
set -euo pipefail
OUT="${1:-docker/certs}"
N="${2:-2}"
command -v openssl >/dev/null || { echo "gen_certs.sh: openssl is required" >&2; exit 1; }
mkdir -p "$OUT"
cd "$OUT"
if [[ ! -f ca.key ]]; then
  openssl req -x509 -newkey rsa:3072 -nodes -days 365 -subj "/CN=fedmerge local CA" \
    -keyout ca.key -out ca.crt 2>/dev/null
fi
if [[ ! -f server.pem ]]; then
  cat > server.cnf <<CNF
[req]
distinguished_name = dn
prompt = no
[dn]
CN = superlink
[ext]
subjectAltName = DNS:superlink,DNS:localhost,IP:127.0.0.1
basicConstraints = CA:FALSE
keyUsage = digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
CNF
  openssl req -newkey rsa:3072 -nodes -keyout server.key -out server.csr -config server.cnf 2>/dev/null
  openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 \
    -extfile server.cnf -extensions ext -out server.pem 2>/dev/null
  rm -f server.csr
fi
for ((i = 0; i < N; i++)); do
  if [[ ! -f "supernode_$i" ]]; then
    if command -v ssh-keygen >/dev/null; then
      ssh-keygen -q -t ecdsa -b 384 -N "" -C "supernode_$i" -f "supernode_$i"
    else
      echo "gen_certs.sh: ssh-keygen is required for SuperNode keys" >&2; exit 1
    fi
  fi
done
chmod 600 ./*.key supernode_* 2>/dev/null || true
chmod 644 ./*.pub ca.crt server.pem 2>/dev/null || true
echo "wrote $(pwd): ca.crt, server.pem/server.key, supernode_0..$((N - 1)) (+ .pub to register with 'flwr supernode register')"

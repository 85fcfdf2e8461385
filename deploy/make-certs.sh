#!/usr/bin/env bash
# The CA and the SuperLink's TLS certificate (same recipe as Flower's certs.yml / dev/certificates).
#
#   deploy/make-certs.sh [OUT_DIR]            # default deploy/certs
#   SUPERLINK_IP=192.168.1.10 SUPERLINK_DNS=fl.example.org deploy/make-certs.sh
#
# Writes OUT_DIR/{ca.key,ca.crt,server.key,server.csr,server.pem}. The certificate's subjectAltName holds
# DNS superlink (the compose service), DNS localhost, IP 127.0.0.1, IP ::1, and SUPERLINK_IP / SUPERLINK_DNS
# when set: every address SuperNodes and `flwr` use to reach the SuperLink must be in it. Existing files are
# kept (delete OUT_DIR to make new ones). ca.crt is what SuperNodes (--root-certificates) and the `flwr`
# connection (root-certificates) need; keep ca.key off the fleet.
set -euo pipefail
OUT="${1:-$(cd "$(dirname "$0")" && pwd)/certs}"
DAYS="${CERT_DAYS:-365}"
mkdir -p "$OUT"
chmod 700 "$OUT"  # ca.key and server.key: owner-only, down to the folder
if [ -f "$OUT/ca.crt" ] && [ -f "$OUT/server.pem" ]; then
  echo "certificates exist in $OUT (delete them to make new ones)"
  exit 0
fi
SAN="DNS.1 = superlink
DNS.2 = localhost
IP.1 = 127.0.0.1
IP.2 = ::1"
[ -n "${SUPERLINK_IP:-}" ] && SAN="$SAN
IP.3 = ${SUPERLINK_IP}"
[ -n "${SUPERLINK_DNS:-}" ] && SAN="$SAN
DNS.3 = ${SUPERLINK_DNS}"
CONF="$OUT/server.conf"
cat > "$CONF" <<CONF
[req]
default_bits = 4096
prompt = no
default_md = sha256
req_extensions = req_ext
distinguished_name = dn

[dn]
C = DE
O = fedsubspace
CN = superlink

[req_ext]
subjectAltName = @alt_names

[alt_names]
$SAN
CONF
umask 077
openssl genrsa -out "$OUT/ca.key" 4096 2>/dev/null
openssl req -new -x509 -key "$OUT/ca.key" -sha256 -subj "/C=DE/O=fedsubspace CA" -days "$DAYS" -out "$OUT/ca.crt"
openssl genrsa -out "$OUT/server.key" 4096 2>/dev/null
openssl req -new -key "$OUT/server.key" -out "$OUT/server.csr" -config "$CONF"
openssl x509 -req -in "$OUT/server.csr" -CA "$OUT/ca.crt" -CAkey "$OUT/ca.key" -CAcreateserial \
  -out "$OUT/server.pem" -days "$DAYS" -sha256 -extfile "$CONF" -extensions req_ext 2>/dev/null
chmod 644 "$OUT/ca.crt" "$OUT/server.pem"
chmod 600 "$OUT/ca.key" "$OUT/server.key" "$OUT/server.csr"
rm -f "$OUT/server.conf"
# The SuperLink container runs as uid 49999 (user `app` of the flwr images) and must read server.key, which
# stays owner-only: its owner becomes 49999. compose mounts the three files it needs one by one, so the
# folder's 700 does not stand in the container's way, and ca.key never enters a container.
if [ "$(id -u)" = 0 ]; then
  chown "${CERT_OWNER:-49999}" "$OUT/server.key"
else
  echo "note: run as root (sudo) or 'sudo chown 49999 $OUT/server.key' so the SuperLink container can read its key" >&2
fi
echo "CA and SuperLink certificate in $OUT (SAN: superlink, localhost, 127.0.0.1, ::1${SUPERLINK_IP:+, $SUPERLINK_IP}${SUPERLINK_DNS:+, $SUPERLINK_DNS})"

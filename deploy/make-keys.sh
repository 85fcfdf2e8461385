#!/usr/bin/env bash
# SuperNode authentication keys: one EC key pair per SuperNode, in OpenSSH format (what Flower 1.41 needs;
# ed25519 or RSA keys are refused with "requires elliptic curve private key", exit code 302).
#
#   deploy/make-keys.sh N [OUT_DIR]            # default deploy/keys -> supernode-1 .. supernode-N (+ .pub)
#   deploy/make-keys.sh --name pi-kitchen [OUT_DIR]   # one key with a chosen name (a device joining later)
#
# The private key stays on its SuperNode (--auth-supernode-private-key); the public key is registered with
# the SuperLink (deploy/register-keys.sh = `flwr supernode register`). Existing keys are kept.
set -euo pipefail
if [ "${1:-}" = "--name" ]; then NAMES=("$2"); shift 2; else N="${1:?usage: make-keys.sh N [OUT_DIR]}"; shift
  NAMES=(); for i in $(seq 1 "$N"); do NAMES+=("supernode-$i"); done; fi
OUT="${1:-$(cd "$(dirname "$0")" && pwd)/keys}"
mkdir -p "$OUT"
for name in "${NAMES[@]}"; do
  if [ -f "$OUT/$name" ]; then echo "key $OUT/$name exists"; continue; fi
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "$name" -f "$OUT/$name"
  # The SuperNode container runs as uid 49999 (user `app` of the flwr images): it must read its key.
  if [ "$(id -u)" = 0 ] && [ -n "${KEY_OWNER:-49999}" ]; then chown "${KEY_OWNER:-49999}" "$OUT/$name"; fi
  echo "$OUT/$name (+ .pub)"
done

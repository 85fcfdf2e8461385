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
chmod 700 "$OUT"  # private keys: owner-only, down to the folder (compose mounts each key file on its own)
for name in "${NAMES[@]}"; do
  if [ -f "$OUT/$name" ]; then echo "key $OUT/$name exists"; continue; fi
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "$name" -f "$OUT/$name"
  chmod 600 "$OUT/$name"
  # The SuperNode container runs as uid 49999 (user `app` of the flwr images) and must read its key, which
  # stays owner-only: its owner becomes 49999 (KEY_OWNER= another uid for a SuperNode run outside Docker).
  if [ "$(id -u)" = 0 ]; then
    chown "${KEY_OWNER:-49999}" "$OUT/$name"
  else
    echo "note: run as root (sudo) or 'sudo chown 49999 $OUT/$name' so a SuperNode container can read it" >&2
  fi
  echo "$OUT/$name (+ .pub)"
done

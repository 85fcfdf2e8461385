#!/usr/bin/env bash
# Register SuperNode public keys with a SuperLink that runs with --enable-supernode-auth.
#
#   deploy/register-keys.sh CONNECTION deploy/keys/supernode-*.pub
#
# CONNECTION is a [superlink.CONNECTION] entry of $FLWR_HOME/config.toml (default ~/.flwr/config.toml), e.g.
#   [superlink.fleet]
#   address = "SUPERLINK_IP:8000"
#   root-certificates = "/abs/path/deploy/certs/ca.crt"
# Each key is registered under its file name (supernode-1.pub -> --name supernode-1). A SuperNode whose key is
# not registered is refused by the SuperLink and exits with code 305.
set -euo pipefail
CONN="${1:?usage: register-keys.sh CONNECTION KEY.pub...}"; shift
FLWR="${FLWR:-$(command -v flwr || echo "$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/flwr")}"
for pub in "$@"; do
  name="$(basename "$pub" .pub)"
  "$FLWR" supernode register "$pub" "$CONN" --name "$name"
done
"$FLWR" supernode list "$CONN"

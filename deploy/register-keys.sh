#!/usr/bin/env bash
# Register SuperNode public keys with a SuperLink that runs with --enable-supernode-auth.
#
#   deploy/register-keys.sh CONNECTION deploy/keys/supernode-*.pub
#   deploy/register-keys.sh CONNECTION          # every deploy/keys/*.pub (the glob expanded here, so that it
#                                               # works under sudo too, where deploy/keys/ is root's, mode 700)
#
# CONNECTION is a [superlink.CONNECTION] entry of $FLWR_HOME/config.toml (default ~/.flwr/config.toml), e.g.
#   [superlink.fleet]
#   address = "SUPERLINK_IP:8000"
#   root-certificates = "/abs/path/deploy/certs/ca.crt"
# Each key is registered under its file name (supernode-1.pub -> --name supernode-1). A SuperNode whose key is
# not registered is refused by the SuperLink: Flower logs exit code 305 and the SuperNode exits with status 1
# (a container: Docker restarts it, so it joins once its key is registered).
set -euo pipefail
CONN="${1:?usage: register-keys.sh CONNECTION [KEY.pub...]}"; shift
FLWR="${FLWR:-$(command -v flwr || echo "$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/flwr")}"
if [ "$#" -eq 0 ]; then
  shopt -s nullglob
  set -- "$(cd "$(dirname "$0")" && pwd)"/keys/*.pub
  [ "$#" -gt 0 ] || { echo "no public keys in $(dirname "$0")/keys: run deploy/make-keys.sh N first" >&2; exit 2; }
fi
for pub in "$@"; do
  name="$(basename "$pub" .pub)"
  "$FLWR" supernode register "$pub" "$CONN" --name "$name"
done
"$FLWR" supernode list "$CONN"

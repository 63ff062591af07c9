#!/usr/bin/env bash
# Installs from Debian what the tests need, if it is missing:
#   tests/deps.sh          numpy and sentencepiece for /usr/bin/python3 (the
#                          reference forward pass and the tokenizer authority)
#   tests/deps.sh --cross  an aarch64 cross compiler and qemu-user, to build
#                          and run the NEON kernels (make test-cross)
set -euo pipefail
PY=${PYTHON:-/usr/bin/python3}
need=()
if [ "${1:-}" = "--cross" ]; then
    command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
    command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
else
    "$PY" -c "import numpy" 2>/dev/null || need+=(python3-numpy)
    "$PY" -c "import sentencepiece" 2>/dev/null || need+=(python3-sentencepiece)
fi
[ ${#need[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null; then
    echo "tests/deps.sh: missing ${need[*]} and no apt-get to install them; install them by hand" >&2
    exit 1
fi
echo "tests/deps.sh: installing ${need[*]}" >&2
sudo=""
[ "$(id -u)" -ne 0 ] && sudo=sudo
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null

#!/usr/bin/env bash
# Installs what the tests need from Debian, if it is missing: numpy and
# sentencepiece for /usr/bin/python3 (the reference and the tokenizer authority),
# and an aarch64 cross compiler with qemu-user, to build and run the NEON kernels.
set -euo pipefail
PY=${PYTHON:-/usr/bin/python3}
need=()
"$PY" -c "import numpy" 2>/dev/null || need+=(python3-numpy)
"$PY" -c "import sentencepiece" 2>/dev/null || need+=(python3-sentencepiece)
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
[ ${#need[@]} -eq 0 ] && exit 0
echo "tests/deps.sh: installing ${need[*]}" >&2
sudo=""
[ "$(id -u)" -ne 0 ] && sudo=sudo
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null

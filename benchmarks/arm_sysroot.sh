#!/usr/bin/env bash
# An aarch64 sysroot for `python -m benchmarks.cross_arch` (docs/bundle.md, "Same answers on
# every CPU"): Debian's arm64 python3.11 and the libraries it loads, unpacked with `dpkg -x`
# (nothing arm64 is installed on the host), and the aarch64 wheels of the runtime's packages
# from PyPI, unpacked, at the versions this venv has. qemu-user comes without
# qemu-user-binfmt: no binfmt handler is registered, the benchmark calls qemu-aarch64 itself.
# Usage: benchmarks/arm_sysroot.sh [SYSROOT]   (default /opt/fedcoe-arm64; needs root for apt)
set -euo pipefail
ROOT=${1:-${FEDCOE_ARM_SYSROOT:-/opt/fedcoe-arm64}}
PY=${PY:-.venv/bin/python}
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
command -v qemu-aarch64 >/dev/null || \
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-user
dpkg --print-foreign-architectures | grep -qx arm64 || { $SUDO dpkg --add-architecture arm64; $SUDO apt-get update -qq; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
chmod 777 "$tmp"
(cd "$tmp" && apt-get download -qq python3.11-minimal:arm64 libpython3.11-minimal:arm64 \
  libpython3.11-stdlib:arm64 libc6:arm64 libgcc-s1:arm64 libstdc++6:arm64 zlib1g:arm64 \
  libexpat1:arm64 libffi8:arm64 libssl3:arm64 libbz2-1.0:arm64 liblzma5:arm64 \
  libsqlite3-0:arm64 libcrypt1:arm64 libuuid1:arm64 libncursesw6:arm64 libtinfo6:arm64)
mkdir -p "$ROOT/site-packages"
for deb in "$tmp"/*.deb; do dpkg -x "$deb" "$ROOT"; done
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
"$PY" -m pip download -q --dest "$tmp/wheels" --only-binary=:all: --python-version 3.11 \
  --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux_2_28_aarch64 \
  "onnxruntime==$(ver onnxruntime)" "numpy==$(ver numpy)" "safetensors==$(ver safetensors)"
for whl in "$tmp"/wheels/*.whl; do "$PY" -m zipfile -e "$whl" "$ROOT/site-packages"; done
echo "aarch64 sysroot ready: $ROOT ($(qemu-aarch64 -L "$ROOT" "$ROOT/usr/bin/python3.11" --version))"

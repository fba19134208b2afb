# Sourced by scripts/demo, scripts/test and .ci/run: installs what the build needs on a fresh
# Debian machine (libclang for RocksDB's bindings, a C++ compiler, ccache) and sets up the build
# environment. Idempotent and quiet when everything is there.
set -euo pipefail

need=()
command -v g++ >/dev/null 2>&1 || need+=(g++)
command -v ccache >/dev/null 2>&1 || need+=(ccache)
ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 || need+=(libclang-dev)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing build prerequisites: ${need[*]}" >&2
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust with rustup (https://rustup.rs) first" >&2
  exit 1
fi
for c in rustfmt clippy; do
  rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c" >/dev/null 2>&1 || true
done

# ccache in front of the C++ compiler: RocksDB's C++ takes ~10 min on 2 cores, ~1 min cached.
export CC="ccache gcc" CXX="ccache g++"
export CCACHE_DIR="${CCACHE_DIR:-/var/cache/funcmesh/ccache}"
# A target dir outside the clone survives fresh clones (CI clones anew every run).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/funcmesh/target}"
mkdir -p "$CCACHE_DIR" "$CARGO_TARGET_DIR" 2>/dev/null || {
  export CCACHE_DIR="$HOME/.cache/funcmesh/ccache" CARGO_TARGET_DIR="$HOME/.cache/funcmesh/target"
  mkdir -p "$CCACHE_DIR" "$CARGO_TARGET_DIR"
}
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

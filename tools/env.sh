# Sourced by the tools: one target directory outside the clone and one profile, so RocksDB's
# C++ (13-20 minutes on 2 cores) is built once per machine, not once per clone or profile.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/kvfs-target}"
if command -v sccache >/dev/null 2>&1 && [ -z "${RUSTC_WRAPPER:-}" ]; then
    export RUSTC_WRAPPER=sccache
fi
KVFS_BIN="$CARGO_TARGET_DIR/debug/kvfs"

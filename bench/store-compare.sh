#!/usr/bin/env bash
# Measures redb vs fjall on the spool's workload (see docs/spool.md). Usage: bench/store-compare.sh [SECONDS]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$here/../target/store-compare}"
cargo build --release --quiet --manifest-path "$here/store-compare/Cargo.toml"
dir="$(mktemp -d "${TMPDIR:-/var/tmp}/store-compare.XXXXXX")"
trap 'rm -rf "$dir"' EXIT
"$CARGO_TARGET_DIR/release/store-compare" "$dir" "${1:-5}"

#!/usr/bin/env bash
# Runs each cargo-fuzz target for a bounded time: normalise, jwt, routes (request input) and
# wal, record, dead (the spool's on-disk decoders: write-ahead frames, event records, dead
# letters).
#
#   fuzz/run.sh [SECONDS] [TARGET...]     (default: 30 s each, every target)
#
# Built without a sanitizer (-s none): under AddressSanitizer the C dependencies are
# instrumented too and librdkafka's configure then fails to link its checks. The targets are
# safe Rust; a panic, an abort, a timeout or an allocation over 64 MiB (capped_alloc.rs, in the
# spool targets) is still a crash. cargo-fuzz needs nightly-only compiler flags. With a nightly
# toolchain: `cargo +nightly fuzz run normalise`. With only a stable toolchain, this script
# sets RUSTC_BOOTSTRAP=1, which lets stable accept them. New inputs go to fuzz/corpus/TARGET
# (git-ignored), seeded from fuzz/seeds/TARGET; crashes land in fuzz/artifacts/TARGET. wal,
# record and dead have no committed seeds yet: their targets build valid headers and
# checksums around the fuzzer's bytes themselves (and encode real events in one mode).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-30}
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(normalise jwt routes wal record dead)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
TOOLCHAIN=()
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  TOOLCHAIN=(+nightly)
else
  export RUSTC_BOOTSTRAP=1
fi
for t in "${TARGETS[@]}"; do
  echo "== fuzz $t for ${SECS}s"
  mkdir -p "fuzz/corpus/$t" "fuzz/seeds/$t"
  cargo "${TOOLCHAIN[@]}" fuzz run -s none "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- -max_total_time="$SECS" 2>&1 |
    grep -E '^(Done|INFO: seed|==[0-9]+==|SUMMARY)|panicked|ERROR' || true
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "fuzz target $t failed (see fuzz/artifacts/$t)"; exit 1; }
done

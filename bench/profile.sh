#!/usr/bin/env bash
# Profiles the router (direct mode, or PROFILE_MODE=spool) with a file sink under the benchmark's load:
# `perf record -e cpu-clock` (software clock: works in VMs without hardware counters)
# attached to the router while wrk runs, then the hottest symbols and shared objects.
#
# Usage: bench/profile.sh [SECONDS]   (default 10; needs perf: apt-get install linux-perf)
# Environment: BENCH_CONNECTIONS (32), BENCH_THREADS (2), BENCH_PORT (18080),
#              PROFILE_OUT (perf.data path; default a temp file, kept and printed),
#              ROUTER_WORKERS (TOKIO_WORKER_THREADS for the router), ROUTER_PRELOAD (LD_PRELOAD for the router only, e.g. an allocator to compare),
#              PROFILE_CALLGRAPH=1 records call graphs (needs a build with frame pointers:
#              RUSTFLAGS="-C force-frame-pointers=yes"),
#              BENCH_BIN=path: profile that router binary (an older build, to compare) and build nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SECS=${1:-10}
CONNS=${BENCH_CONNECTIONS:-32}
THREADS=${BENCH_THREADS:-2}
PORT=${BENCH_PORT:-18080}
command -v perf >/dev/null || { echo "perf is missing: apt-get install linux-perf" >&2; exit 2; }
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 2; }

# The same build as bench/run.sh (same feature set: no rebuild when switching between them).
if [ -z "${BENCH_BIN:-}" ]; then
  cargo build --release --locked --bin webio-router --example bare --example kafka_mock --example amqp_queue >&2
fi
BIN=${BENCH_BIN:-$ROOT/target/release/webio-router}
DIR=$(mktemp -d "${TMPDIR:-/tmp}/webio-profile.XXXXXX")
OUT=${PROFILE_OUT:-$DIR/perf.data}
cat >"$DIR/webio-router.toml" <<TOML
routes_file = "$DIR/routes.toml"
[server]
listen = "127.0.0.1:$PORT"
[admin]
listen = "127.0.0.1:$((PORT + 1))"
[auth]
secrets = ["bench-secret-0123456789-0123456789-0123456789"]
[delivery]
mode = "${PROFILE_MODE:-direct}"
spool_dir = "$DIR/spool"
dead_letter_file = "$DIR/dead-letter.jsonl"
TOML
cat >"$DIR/routes.toml" <<TOML
[sinks.out]
type = "file"
path = "$DIR/events.jsonl"

[[routes]]
name = "everything"
to = ["out"]
TOML
TOKEN=$("$BIN" --config "$DIR/webio-router.toml" token --ttl 0 --org 1234)
env LD_PRELOAD=${ROUTER_PRELOAD:-} ${ROUTER_WORKERS:+TOKIO_WORKER_THREADS=$ROUTER_WORKERS} "$BIN" --config "$DIR/webio-router.toml" serve 2>"$DIR/router.log" &
PID=$!
# Keep the perf data, not the events written under load.
trap 'kill $PID 2>/dev/null || true; wait $PID 2>/dev/null || true; rm -f "$DIR/events.jsonl"' EXIT
for _ in $(seq 1 200); do grep -q "webio-router ready" "$DIR/router.log" && break; sleep 0.05; done

cpu_ns() { cat /proc/"$PID"/task/*/schedstat 2>/dev/null | awk '{ s += $1 } END { print s }'; }
CPU0=$(cpu_ns)
CG=()
[ "${PROFILE_CALLGRAPH:-0}" = 1 ] && CG=(--call-graph fp)
perf record -e cpu-clock -F 1999 "${CG[@]}" -p "$PID" -o "$OUT" -- sleep "$SECS" 2>"$DIR/perf.log" &
REC=$!
RESULT=$(WEBIO_TOKEN=$TOKEN wrk -t"$THREADS" -c"$CONNS" -d"${SECS}s" --latency -s "$ROOT/bench/webio.lua" \
  "http://127.0.0.1:$PORT/webhooks/webio" | grep '^WEBIO_BENCH')
CPU1=$(cpu_ns)
echo "$RESULT"
REQS=$(echo "$RESULT" | sed -n 's/.* requests=\([0-9]*\).*/\1/p')
awk -v c=$((CPU1 - CPU0)) -v n="$REQS" 'BEGIN { printf "router CPU per request: %.1f us (all threads, perf overhead included)\n", c / 1000 / n }'
wait "$REC" || true
grep -E '^(VmHWM|VmRSS)' "/proc/$PID/status" || true
echo
echo "== by shared object"
perf report -i "$OUT" --stdio --no-children --sort dso 2>/dev/null | grep -v '^#' | grep -v '^$' | head -12
echo
echo "== hottest symbols"
perf report -i "$OUT" --stdio --no-children --sort sym 2>/dev/null | grep -v '^#' | grep -v '^$' | head -${PROFILE_TOP:-60}
echo
echo "perf data: $OUT (perf report -i $OUT)"

#!/usr/bin/env bash
# Instructions per request, counted by valgrind's callgrind: repeatable whatever else the
# machine does (wall-clock numbers on a shared VM move by ±20 %; instruction counts by < 1 %).
#
# Runs the release router (or the bare floor) under callgrind, warms it up, zeroes the
# counters, sends BENCH_REQUESTS-ish requests with wrk (bench/webio.lua: the same distinct
# payloads as bench/run.sh), dumps, and prints instructions per request for the whole process
# (every thread: tokio worker, sink threads, metrics upkeep) and the costliest functions
# (inclusive). Note: valgrind does not emulate SHA-NI, so SHA-256 runs sha2's portable code
# here (~21 000 instructions per event) where the real CPU uses its SHA instructions.
#
# Usage: bench/callgrind.sh [ROW]   rows: bare unrouted (default) direct-file (the file sink
#              with fsync = true, its default) direct-file-os (the same with fsync = false)
#              spool-file (spool mode, one file sink; counted once every event is in the file)
# Environment: CALLGRIND_SECONDS (20: measured load), CALLGRIND_OUT (output file; default a
#              temp file, printed), CALLGRIND_TOP (30), BENCH_PORT (18180), LOG_LEVEL (info),
#              BENCH_BIN (the router binary; default target/release/webio-router).
# Needs valgrind (apt-get install valgrind) and wrk. Builds nothing: run `cargo build
# --release --bin webio-router --example bare` first (bench/run.sh does).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ROW=${1:-unrouted}
SECS=${CALLGRIND_SECONDS:-20}
PORT=${BENCH_PORT:-18180}
TOP=${CALLGRIND_TOP:-30}
BIN=${BENCH_BIN:-$ROOT/target/release/webio-router}
DIR=$(mktemp -d "${TMPDIR:-/tmp}/webio-callgrind.XXXXXX")
OUT=${CALLGRIND_OUT:-$DIR/callgrind.out}
SECRET="bench-secret-0123456789-0123456789-0123456789"
command -v valgrind >/dev/null || { echo "valgrind is missing: apt-get install valgrind" >&2; exit 2; }
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 2; }

cat >"$DIR/webio-router.toml" <<TOML
routes_file = "$DIR/routes.toml"
[server]
listen = "127.0.0.1:$PORT"
[admin]
listen = "127.0.0.1:$((PORT + 1))"
# In the work directory: the default (var/control.sock under the checkout) would clash with
# another daemon started from the same checkout.
control_socket = "$DIR/control.sock"
[auth]
secrets = ["$SECRET"]
[delivery]
mode = "direct"
dead_letter_file = "$DIR/dead-letter.jsonl"
[log]
level = "${LOG_LEVEL:-info}"
TOML
WHEN=""
[ "$ROW" = unrouted ] && WHEN='when = { type = "no-such-type" }'
cat >"$DIR/routes.toml" <<TOML
[sinks.out]
type = "file"
path = "$DIR/events.jsonl"
$([ "$ROW" != direct-file-os ] || echo 'fsync = false')

[[routes]]
name = "everything"
$WHEN
to = ["out"]
TOML

case $ROW in
  bare) CMD=("$ROOT/target/release/examples/bare" "127.0.0.1:$PORT" 202); TOKEN=unused ;;
  unrouted | direct-file | direct-file-os)
    CMD=("$BIN" --config "$DIR/webio-router.toml" serve)
    TOKEN=$("$BIN" --config "$DIR/webio-router.toml" token --ttl 0 --org 1234) ;;
  spool-file) # spool mode (bench/run.sh's spool-file row): the events go through the spool
    sed -i "s|^mode = \"direct\"\$|mode = \"spool\"\nspool_dir = \"$DIR/spool\"|" "$DIR/webio-router.toml"
    CMD=("$BIN" --config "$DIR/webio-router.toml" serve)
    TOKEN=$("$BIN" --config "$DIR/webio-router.toml" token --ttl 0 --org 1234) ;;
  *) echo "unknown row $ROW (bare unrouted direct-file direct-file-os spool-file)" >&2; exit 2 ;;
esac

valgrind --tool=callgrind --callgrind-out-file="$OUT" "${CMD[@]}" >"$DIR/server.log" 2>&1 &
PID=$!
# The work directory goes at the end, unless the output is in it (no CALLGRIND_OUT).
KEEP_DIR=$([ -n "${CALLGRIND_OUT:-}" ] && echo 0 || echo 1)
trap 'kill $PID 2>/dev/null || true; wait $PID 2>/dev/null || true; rm -f "$DIR/events.jsonl"; [ "$KEEP_DIR" = 1 ] || rm -rf "$DIR"' EXIT
up() { { exec 3<>"/dev/tcp/127.0.0.1/$PORT"; } 2>/dev/null && exec 3>&-; }
for _ in $(seq 1 600); do up && break; sleep 0.1; done
load() { # seconds
  WEBIO_TOKEN=$TOKEN wrk -t1 -c4 -d"$1s" -s "$ROOT/bench/webio.lua" "http://127.0.0.1:$PORT/webhooks/webio" |
    grep '^WEBIO_BENCH'
}
load 5 >/dev/null # warm up: caches, connection pools, lazily made metric handles
callgrind_control -z "$PID" >/dev/null
RESULT=$(load "$SECS")
sleep 1
# Spool mode delivers after the 202: counted once every accepted event is in the file.
lines() { wc -l <"$DIR/events.jsonl" 2>/dev/null || echo 0; }
[ "$ROW" != spool-file ] || { n=-1; while [ "$(lines)" != "$n" ]; do n=$(lines); sleep 1; done; }
callgrind_control -d "$PID" >/dev/null
sleep 1
REQS=$(echo "$RESULT" | sed -n 's/.* requests=\([0-9]*\).*/\1/p')
NON2XX=$(echo "$RESULT" | sed -n 's/.* non2xx=\([0-9]*\).*/\1/p')
# The dump after zeroing is the newest file with the pid suffix.
DUMP=$(ls -t "$OUT"* | head -1)
TOTAL=$(callgrind_annotate "$DUMP" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1; exit }')
echo "row=$ROW binary=${CMD[0]} requests=$REQS non2xx=$NON2XX instructions=$TOTAL per_request=$((TOTAL / REQS))"
if [ "$TOP" -gt 0 ]; then
  echo
  echo "== inclusive, per request (callgrind_annotate --inclusive=yes)"
  callgrind_annotate --inclusive=yes "$DUMP" 2>/dev/null | grep -E '^ *[0-9,]+ ' | head -"$TOP" |
    awk -v n="$REQS" '{ c = $1; gsub(",", "", c); $1 = ""; printf "%8d %s\n", c / n, substr($0, 1, 160) }'
fi
echo "callgrind output: $DUMP (callgrind_annotate --tree=calling --inclusive=yes)"

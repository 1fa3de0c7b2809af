#!/usr/bin/env bash
# Where the time goes per thread in spool mode with one file sink (issue 14): starts the router
# (spool mode, one file sink with fsync, the same configuration as bench/run.sh's spool-file
# row), runs wrk with distinct payloads (bench/webio.lua), waits until every accepted event is
# in the sink's file, and prints per thread name (tokio workers summed):
#   CPU µs per event      (/proc/<pid>/task/<tid>/schedstat, time on the CPU)
#   voluntary context switches per event   (/proc/<pid>/task/<tid>/status)
#   fdatasync + fsync calls per event      (perf stat on the syscalls tracepoints, per thread;
#                                           "-" when perf cannot count them here)
# Events = lines the file sink wrote during the run. Repeat with BENCH_BIN for another build
# and compare side by side; the machine's load average is printed with the numbers.
#
# Usage: bench/threads.sh
# Environment: BENCH_BIN=path (the router binary; default: target/release/webio-router, built
#              if missing), BENCH_DURATION (10s), BENCH_CONNECTIONS (32), BENCH_THREADS (2),
#              BENCH_PORT (18280; uses 2 consecutive ports), BENCH_KEEP=1 keeps the work
#              directory (configs, logs, wrk and perf output), BENCH_SINK_OPTIONS: more lines
#              for the file sink's table (e.g. "concurrency = 64", the drain's round size),
#              BENCH_BACKLOG=1: the sink is paused while wrk runs, then resumed; the numbers are
#              those of draining that backlog (full rounds), with its rate in events/s.
#              BENCH_MODE=direct: direct mode instead of spool mode (bench/run.sh's direct-file
#              row; with BENCH_SINK_OPTIONS="fsync = false" its direct-file-os row);
#              BENCH_MODE=unrouted: direct mode, a route that matches nothing (events = requests).
# Also printed: every syscall (raw_syscalls:sys_enter) and involuntary switch per event.
# Loopback only. Needs wrk; perf is optional (for the fdatasync counts).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DURATION=${BENCH_DURATION:-10s}
CONNS=${BENCH_CONNECTIONS:-32}
THREADS=${BENCH_THREADS:-2}
PORT=${BENCH_PORT:-18280}
HOOK=$PORT ADMIN=$((PORT + 1))
SECRET="bench-secret-0123456789-0123456789-0123456789"
say() { printf '%s\n' "$*" >&2; }

command -v wrk >/dev/null || { say "wrk is needed (apt-get install wrk)"; exit 2; }
if [ -z "${BENCH_BIN:-}" ] && [ ! -x "$ROOT/target/release/webio-router" ]; then
  cargo build --release --locked --bin webio-router >&2
fi
BIN=${BENCH_BIN:-$ROOT/target/release/webio-router}

for p in $HOOK $ADMIN; do
  if { exec 3<>"/dev/tcp/127.0.0.1/$p"; } 2>/dev/null; then
    exec 3>&-
    say "port $p is in use; set BENCH_PORT to a free range"
    exit 2
  fi
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/webio-threads.XXXXXX")
PID="" PERF=""
cleanup() {
  [ -z "$PERF" ] || kill -INT "$PERF" 2>/dev/null || true
  if [ -n "$PID" ]; then
    kill -TERM "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
  fi
  if [ "${BENCH_KEEP:-0}" = 1 ]; then say "work directory kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

cat >"$WORK/webio-router.toml" <<EOF
routes_file = "$WORK/routes.toml"
[server]
listen = "127.0.0.1:$HOOK"
path = "/webhooks/webio"
[admin]
listen = "127.0.0.1:$ADMIN"
control_socket = "$WORK/control.sock"
[auth]
secrets = ["$SECRET"]
[delivery]
$(if [ "${BENCH_MODE:-spool}" = spool ]; then printf 'mode = "spool"\nspool_dir = "%s/spool"' "$WORK"; else echo 'mode = "direct"'; fi)
dead_letter_file = "$WORK/dead-letter.jsonl"
shutdown_timeout = "2s"
[log]
level = "info"
EOF
cat >"$WORK/routes.toml" <<EOF
[sinks.out]
type = "file"
path = "$WORK/events.jsonl"
${BENCH_SINK_OPTIONS:-}

[[routes]]
name = "everything"
$([ "${BENCH_MODE:-spool}" != unrouted ] || echo 'when = { type = "no-such-type" }')
to = ["out"]
EOF

TOKEN=$("$BIN" --config "$WORK/webio-router.toml" token --ttl 0 --org 1234)
"$BIN" --config "$WORK/webio-router.toml" serve >"$WORK/router.log" 2>&1 &
PID=$!
ready=""
for _ in $(seq 1 300); do
  if curl -fsS -o /dev/null "http://127.0.0.1:$ADMIN/readyz" 2>/dev/null; then ready=1; break; fi
  kill -0 "$PID" 2>/dev/null || break
  sleep 0.05
done
[ -n "$ready" ] || { say "the router did not get ready: $(tail -3 "$WORK/router.log")"; exit 1; }
sleep 0.5

lines() { if [ -f "$WORK/events.jsonl" ]; then wc -l <"$WORK/events.jsonl"; else echo 0; fi; }

# One line per thread: tid name cpu_ns voluntary_switches involuntary_switches
snapshot() {
  local t name cpu vol
  for t in /proc/"$PID"/task/*; do
    name=$(tr ' ' '_' <"$t/comm" 2>/dev/null) || continue
    cpu=$(cut -d' ' -f1 "$t/schedstat" 2>/dev/null) || continue
    vol=$(awk '/^voluntary_ctxt_switches/ { v = $2 } /^nonvoluntary_ctxt_switches/ { n = $2 } END { print v, n }' "$t/status" 2>/dev/null) || continue
    echo "${t##*/} $name $cpu $vol"
  done
}

BACKLOG=${BENCH_BACKLOG:-0}
cli() { "$BIN" --config "$WORK/webio-router.toml" "$@" >>"$WORK/cli.txt" 2>&1; }
start_counting() {
  LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
  L0=$(lines)
  snapshot >"$WORK/before.txt"
  if command -v perf >/dev/null; then
    perf stat --per-thread -x, -e syscalls:sys_enter_fdatasync,syscalls:sys_enter_fsync,raw_syscalls:sys_enter \
      -p "$PID" -o "$WORK/perf.txt" >/dev/null 2>&1 &
    PERF=$!
    sleep 0.2
  fi
  T0=${EPOCHREALTIME/./}
}
[ "$BACKLOG" = 1 ] && cli pause out
[ "$BACKLOG" = 1 ] || start_counting
say "== wrk -t$THREADS -c$CONNS -d$DURATION ($BIN)"
WEBIO_TOKEN=$TOKEN wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency -s "$ROOT/bench/webio.lua" \
  "http://127.0.0.1:$HOOK/webhooks/webio" >"$WORK/wrk.txt" 2>&1 || true
if [ "$BACKLOG" = 1 ]; then
  start_counting
  cli resume out
fi
# Every accepted event reaches the file: wait until its line count stays put.
# T1: when the last new line was seen (polled every 0.05 s; done once 0.5 s pass without one).
prev=$(lines) T1=${EPOCHREALTIME/./} still=0
while [ "$still" -lt 10 ]; do
  sleep 0.05
  cur=$(lines)
  if [ "$cur" != "$prev" ]; then prev=$cur T1=${EPOCHREALTIME/./} still=0; else still=$((still + 1)); fi
done
snapshot >"$WORK/after.txt"
if [ -n "$PERF" ]; then
  kill -INT "$PERF" 2>/dev/null || true
  wait "$PERF" 2>/dev/null || true
  PERF=""
fi
EVENTS=$(($(lines) - L0))
if [ "${BENCH_MODE:-spool}" = unrouted ]; then
  EVENTS=$(grep '^WEBIO_BENCH' "$WORK/wrk.txt" | tail -1 | tr ' ' '\n' | sed -n 's/^requests=//p')
fi
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
[ "$EVENTS" -gt 0 ] || { say "no event was delivered: $(tail -3 "$WORK/router.log")"; exit 1; }

# perf -x, --per-thread lines: "<comm>-<tid>,<count>,,<event>,..."
SYNCS=$WORK/syncs.txt
: >"$SYNCS"
if [ -s "$WORK/perf.txt" ]; then
  awk -F, '$4 ~ /sys_enter/ && $2 ~ /^[0-9]+$/ { n = split($1, a, "-"); print a[n], $2, ($4 ~ /raw_syscalls/ ? "all" : "sync") }' \
    "$WORK/perf.txt" >"$SYNCS"
fi

rps=$(grep '^WEBIO_BENCH' "$WORK/wrk.txt" | tail -1 | tr ' ' '\n' | sed -n 's/^rps=//p')
echo
echo "$(date -u '+%Y-%m-%d %H:%M UTC'), load average before $LOAD_BEFORE, after $LOAD_AFTER; $(nproc) cores"
echo "binary: $BIN${BENCH_SINK_OPTIONS:+ (sink options: $BENCH_SINK_OPTIONS)}"
echo "wrk -t$THREADS -c$CONNS -d$DURATION: ${rps:-?} req/s; events delivered: $EVENTS"
if [ "$BACKLOG" = 1 ]; then
  echo "backlog drained (sink paused during wrk, then resumed): $(awk -v n="$EVENTS" -v us=$((10#$T1 - 10#$T0)) 'BEGIN { printf "%.0f events/s (%.2f s)", n / (us / 1e6), us / 1e6 }')"
fi
echo
echo "| thread | threads | CPU µs/event | voluntary switches/event | involuntary/event | syscalls/event | fdatasync+fsync/event |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
awk -v events="$EVENTS" -v perf="$([ -s "$WORK/perf.txt" ] && echo 1 || echo 0)" '
  FILENAME == ARGV[1] { cpu0[$1] = $3; vol0[$1] = $4; inv0[$1] = $5; next }
  FILENAME == ARGV[2] {
    name = $2
    if (name ~ /^tokio-r/) name = "tokio workers"
    cpu[name] += $3 - cpu0[$1]; vol[name] += $4 - vol0[$1]; inv[name] += $5 - inv0[$1]; count[name]++; group[$1] = name
    next
  }
  $3 == "sync" { syncs[group[$1]] += $2 }
  $3 == "all" { calls[group[$1]] += $2 }
  END {
    for (name in cpu) {
      s = perf ? sprintf("%.3f", syncs[name] / events) : "-"
      c = perf ? sprintf("%.2f", calls[name] / events) : "-"
      printf "| %s | %d | %.2f | %.3f | %.3f | %s | %s |\n", name, count[name], cpu[name] / 1000 / events, vol[name] / events, inv[name] / events, c, s
    }
  }' "$WORK/before.txt" "$WORK/after.txt" "$SYNCS" | sort -t'|' -k4 -gr

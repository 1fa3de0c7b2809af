#!/usr/bin/env bash
# The benchmark: builds in release mode, then measures side by side, in one run, with the
# same load generator and connection count:
#
#   bare hyper (examples/bare.rs, the floor) | router direct + file | spool + file |
#   spool + HTTP sink (a local 200 responder) | spool + RabbitMQ | spool + Kafka (mock cluster)
#
# and prints a markdown table: requests/s, ratio to bare, p50/p99 latency, non-2xx count,
# p99 at half the sustained rate, peak RSS under load, idle RSS, start-to-ready time.
# A row whose configuration `webio-router check` refuses (e.g. spool mode or a sink type not
# in this build) prints "n/a (not available in this build)".
#
# Usage: bench/run.sh [ROW...]     rows: bare unrouted direct-file direct-file-os spool-file spool-http spool-amqp spool-kafka
# (`unrouted`: the router with a route that matches nothing: token, body, normalisation and the
# answer, no delivery; the ceiling of every other row. `direct-file-os`: the file sink with
# `fsync = false`, confirmed once the OS has the line: the same path without the disk's latency.)
# Each router row is measured BENCH_REPEAT times (5), each run right after a run of the bare
# server with the same load; the ratio is the median of those pairs (the machine's other work
# moves both alike), and the row shows that pair's router run.
# Every run (the bare one of a pair included) and the half-rate run start once the spool's backlog
# left by the run before is delivered (at most BENCH_SETTLE seconds, 90; the table's notes say
# how long each row's last wait took): a drain still working through it would take CPU from the
# next run, and at half rate its memtable's bound would bring checkpoints of the previous load.
# Environment: BENCH_DURATION (10s), BENCH_SETTLE (90), BENCH_REPEAT (5), BENCH_CONNECTIONS (32), BENCH_THREADS (2),
#              BENCH_PORT (18080; uses 4 consecutive ports), BENCH_AMQP_URL,
#              BENCH_KEEP=1 keeps the work directory (configs, logs, wrk output),
#              BENCH_BIN=path: measure that router binary (an older build, to compare) and build
#              nothing (the bench examples must be built already).
# Loopback only. Needs wrk (installed with apt-get when missing) and, for the RabbitMQ row,
# a broker on 127.0.0.1:5672 (guest/guest).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DURATION=${BENCH_DURATION:-10s}
REPEAT=${BENCH_REPEAT:-5}
CONNS=${BENCH_CONNECTIONS:-32}
THREADS=${BENCH_THREADS:-2}
PORT=${BENCH_PORT:-18080}
AMQP_URL=${BENCH_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
SECRET="bench-secret-0123456789-0123456789-0123456789"
ALL_ROWS=(bare unrouted direct-file direct-file-os spool-file spool-http spool-amqp spool-kafka)
ROWS=("$@")
[ ${#ROWS[@]} -gt 0 ] || ROWS=("${ALL_ROWS[@]}")

say() { printf '%s\n' "$*" >&2; }

# ---------------------------------------------------------------- tools and build
if ! command -v wrk >/dev/null; then
  say "== installing wrk"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk >&2
fi

if [ -z "${BENCH_BIN:-}" ]; then
  say "== cargo build --release (router and bench examples)"
  cargo build --release --locked --bin webio-router --example bare --example kafka_mock --example amqp_queue >&2
fi
BIN=${BENCH_BIN:-$ROOT/target/release/webio-router}
EX=$ROOT/target/release/examples

WORK=$(mktemp -d "${TMPDIR:-/tmp}/webio-bench.XXXXXX")
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ "${BENCH_KEEP:-0}" = 1 ]; then say "work directory kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

HOOK=$PORT ADMIN=$((PORT + 1)) SINK_PORT=$((PORT + 2)) BARE_PORT=$((PORT + 3))
for p in $HOOK $ADMIN $SINK_PORT $BARE_PORT; do
  if { exec 3<>"/dev/tcp/127.0.0.1/$p"; } 2>/dev/null; then
    exec 3>&-
    say "port $p is in use; set BENCH_PORT to a free range"
    exit 2
  fi
done

# ---------------------------------------------------------------- helpers
now_us() { local t=${EPOCHREALTIME/./}; echo "$((10#$t))"; }

# STATUS=<HTTP status of GET $2 on 127.0.0.1:$1>, or "" (no fork: bash's /dev/tcp).
STATUS=""
http_status() {
  STATUS=""
  local fd line
  { exec {fd}<>"/dev/tcp/127.0.0.1/$1"; } 2>/dev/null || return 0
  printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$2" >&"$fd" 2>/dev/null || true
  IFS= read -r -t 2 line <&"$fd" || true
  exec {fd}>&-
  STATUS=$(set -- $line; echo "${2:-}")
}

# Waits until GET $2 on port $1 answers $3 (any status when $3 is "any"); 0 = ready.
wait_status() {
  local port=$1 path=$2 want=$3 pid=$4 deadline=$(($(now_us) + 30000000))
  while [ "$(now_us)" -lt "$deadline" ]; do
    kill -0 "$pid" 2>/dev/null || return 1
    http_status "$port" "$path"
    if [ -n "$STATUS" ] && { [ "$want" = any ] || [ "$STATUS" = "$want" ]; }; then return 0; fi
    sleep 0.002
  done
  return 1
}

kib() { awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f MiB", k / 1024 }'; }
ms() { awk -v u="$1" 'BEGIN { printf "%.2f ms", u / 1000 }'; }

# wrk at full speed (WEBIO_RATE unset) or paced; echoes the WEBIO_BENCH line's fields.
run_wrk() { # port token out rate
  local port=$1 token=$2 out=$3 rate=${4:-}
  WEBIO_TOKEN=$token WEBIO_RATE=$rate wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency \
    -s "$ROOT/bench/webio.lua" "http://127.0.0.1:$port/webhooks/webio" >"$out" 2>&1 || true
  grep '^WEBIO_BENCH' "$out" | tail -1 | cut -d' ' -f2-
}
field() { local k=$1 kv; shift; for kv in "$@"; do if [ "${kv%%=*}" = "$k" ]; then echo "${kv#*=}"; fi; done; }

# The spool's backlog (events accepted, not yet delivered), summed over sinks; empty when the
# row has no spool or its metrics are not up.
pending() {
  curl -s --max-time 2 "http://127.0.0.1:$ADMIN/metrics" 2>/dev/null |
    awk '$1 ~ /^webio_router_spool_pending(\{|$)/ { n += $2; seen = 1 } END { if (seen) printf "%d", n }'
}

# Waits (at most BENCH_SETTLE seconds) until the spool's backlog left by the previous run is
# delivered, so that every run starts from an empty spool: a drain still working through the
# last run's backlog takes CPU from the next run, and its memtable's bound brings checkpoints that
# belong to the previous load. Echoes how long it waited and what was left ("" for no spool).
settle() { # pid
  local t0 left deadline
  t0=$(now_us) deadline=$(($(now_us) + ${BENCH_SETTLE:-90} * 1000000))
  left=$(pending)
  [ -n "$left" ] || return 0
  while [ "$left" != 0 ] && [ "$(now_us)" -lt "$deadline" ] && kill -0 "$1" 2>/dev/null; do
    sleep 0.1
    left=$(pending)
  done
  echo "$(( ($(now_us) - t0) / 1000 )) ms, ${left:-?} left"
}

stop() { # pid
  kill -TERM "$1" 2>/dev/null || true
  local i
  for i in $(seq 1 100); do kill -0 "$1" 2>/dev/null || break; sleep 0.05; done
  kill -KILL "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

# ---------------------------------------------------------------- configs
write_config() { # dir mode
  cat >"$1/webio-router.toml" <<EOF
routes_file = "$1/routes.toml"
[server]
listen = "127.0.0.1:$HOOK"
path = "/webhooks/webio"
[admin]
listen = "127.0.0.1:$ADMIN"
# In the run's directory: the default (var/control.sock under the checkout) would clash with
# another run's daemon started from the same checkout.
control_socket = "$1/control.sock"
[auth]
secrets = ["$SECRET"]
[delivery]
mode = "$2"
spool_dir = "$1/spool"
dead_letter_file = "$1/dead-letter.jsonl"
shutdown_timeout = "2s"
[log]
level = "info"
EOF
}

write_routes() { # dir kind
  local sink
  case $2 in
    file) sink="type = \"file\"
path = \"$1/events.jsonl\"" ;;
    file-os) sink="type = \"file\"
path = \"$1/events.jsonl\"
fsync = false" ;;
    http) sink="type = \"http\"
url = \"http://127.0.0.1:$SINK_PORT/ingest\"" ;;
    amqp) sink="type = \"amqp\"
url = \"$AMQP_URL\"
exchange = \"webio-bench\"
routing_key = \"webio.{type}\"" ;;
    kafka) sink="type = \"kafka\"
brokers = \"$KAFKA_BOOTSTRAP\"
topic = \"webio-bench\"" ;;
  esac
  local when=""
  if [ "$2" = none ]; then
    sink="type = \"file\"
path = \"$1/events.jsonl\""
    when='when = { type = "no-such-type" }'
  fi
  cat >"$1/routes.toml" <<EOF
[sinks.out]
$sink

[[routes]]
name = "everything"
$when
to = ["out"]
EOF
}

# ---------------------------------------------------------------- one row
declare -A R_SETTLE R_RPS R_CELLS R_P99HALF R_PEAK R_IDLE R_READY R_NON2XX R_RATIO R_RATIOS
BARE_RPS=""

na_row() { R_CELLS[$1]="| $1 | $2 | | | | | | | | |"; }

measure() { # name pid port token
  local name=$1 pid=$2 port=$3 token=$4
  local full half rps p50 p99 non2xx sockerr hrps hp99 peak
  sleep 0.5
  R_IDLE[$name]=$(kib "$pid" VmRSS)
  # Router rows: REPEAT pairs, each a bare run then a router run back to back; the row shows
  # the pair with the median ratio (other work on the machine moves both alike).
  local i best="" ratios="" pairs=() b r s
  for i in $(seq 1 "$( [ "$name" = bare ] && echo 1 || echo "$REPEAT")"); do
    b=""
    if [ "$name" != bare ]; then
      s=$(settle "$pid")
      [ -z "$s" ] || say "   settled: $s"
      b=$(run_wrk "$BARE_PORT" unused "$WORK/$name.bare$i.txt")
      # shellcheck disable=SC2086
      b=$(field rps $b)
    fi
    say "   load: wrk -t$THREADS -c$CONNS -d$DURATION (run $i)"
    full=$(run_wrk "$port" "$token" "$WORK/$name.wrk$i.txt")
    if [ -z "$full" ] || ! kill -0 "$pid" 2>/dev/null; then
      na_row "$name" "failed: see $WORK/$name.* (BENCH_KEEP=1 keeps them)"
      return
    fi
    # shellcheck disable=SC2086
    r=$(field rps $full)
    [ -n "$b" ] || b=$r
    pairs+=("$(awk -v r="$r" -v b="$b" 'BEGIN { printf "%.4f", r / b }') $full")
    ratios="$ratios $(awk -v r="$r" -v b="$b" 'BEGIN { printf "%.2f", r / b }')"
  done
  best=$(printf '%s\n' "${pairs[@]}" | sort -n | awk -v n="${#pairs[@]}" 'NR == int((n + 1) / 2)')
  R_RATIO[$name]=${best%% *}
  R_RATIOS[$name]=$ratios
  full=${best#* }
  # shellcheck disable=SC2086
  set -- $full
  rps=$(field rps "$@") p50=$(field p50_us "$@") p99=$(field p99_us "$@")
  non2xx=$(field non2xx "$@") sockerr=$(field sockerr "$@")
  local per_thread
  per_thread=$(awk -v r="$rps" -v t="$THREADS" 'BEGIN { printf "%.1f", r / 2 / t }')
  if [ "$name" != bare ]; then
    s=$(settle "$pid")
    [ -z "$s" ] || say "   settled: $s"
    [ -z "$s" ] || R_SETTLE[$name]=$s
  fi
  say "   half rate: $(awk -v r="$rps" 'BEGIN { printf "%.0f", r / 2 }') req/s target"
  half=$(run_wrk "$port" "$token" "$WORK/$name.half.txt" "$per_thread")
  # shellcheck disable=SC2086
  set -- $half
  hrps=$(field rps "$@") hp99=$(field p99_us "$@")
  peak=$(kib "$pid" VmHWM)
  [ -n "$BARE_RPS" ] || BARE_RPS=$rps
  R_RPS[$name]=$rps R_P99HALF[$name]=$hp99 R_PEAK[$name]=$peak R_NON2XX[$name]=$((non2xx + ${sockerr:-0}))
  local ratio errs=""
  ratio=$(awk -v r="${R_RATIO[$name]}" 'BEGIN { printf "%.2f", r }')
  [ "${sockerr:-0}" = 0 ] || errs=" (+$sockerr socket errors)"
  R_CELLS[$name]="| $name | $(printf '%.0f' "$rps") | $ratio | $(ms "$p50") | $(ms "$p99") | ${non2xx}${errs} | $(ms "$hp99") at $(printf '%.0f' "$hrps")/s | $(mib "$peak") | $(mib "${R_IDLE[$name]}") | ${R_READY[$name]:-—} |"
}

row_bare() {
  local log=$WORK/bare.log pid t0
  t0=$(now_us)
  "$EX/bare" "127.0.0.1:$BARE_PORT" 202 >"$log" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  if ! wait_status "$BARE_PORT" / any "$pid"; then na_row bare "failed to start: $(tail -1 "$log")"; return; fi
  R_READY[bare]=$(ms $(($(now_us) - t0)))
  measure bare "$pid" "$BARE_PORT" "unused"
  # Kept running (idle between its runs): every router run is paired with a bare run.
}

row_router() { # name mode sink-kind
  local name=$1 mode=$2 kind=$3 dir=$WORK/$1 pid t0 token
  mkdir -p "$dir"
  write_config "$dir" "$mode"
  write_routes "$dir" "$kind"
  if ! "$BIN" --config "$dir/webio-router.toml" check >"$dir/check.txt" 2>&1; then
    say "   webio-router check refused the configuration: $(head -1 "$dir/check.txt")"
    na_row "$name" "n/a (not available in this build)"
    return
  fi
  if [ "$kind" = amqp ] && ! "$EX/amqp_queue" "$AMQP_URL" webio-bench >"$dir/amqp.txt" 2>&1; then
    na_row "$name" "n/a (RabbitMQ: $(tail -1 "$dir/amqp.txt"))"
    return
  fi
  token=$("$BIN" --config "$dir/webio-router.toml" token --ttl 0 --org 1234)
  t0=$(now_us)
  "$BIN" --config "$dir/webio-router.toml" serve >"$dir/router.log" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  if ! wait_status "$ADMIN" /readyz 200 "$pid"; then
    na_row "$name" "failed to start: $(tail -1 "$dir/router.log")"
    stop "$pid"
    return
  fi
  R_READY[$name]=$(ms $(($(now_us) - t0)))
  measure "$name" "$pid" "$HOOK" "$token"
  stop "$pid"
}

start_sink_responder() {
  # One worker: the responder stands in for a remote service; with one per core it would
  # fight the router and wrk for the same two cores and add its own scheduling delays.
  TOKIO_WORKER_THREADS=1 "$EX/bare" "127.0.0.1:$SINK_PORT" 200 >"$WORK/sink.log" 2>&1 &
  SINK_PID=$!
  PIDS+=("$SINK_PID")
  wait_status "$SINK_PORT" / any "$SINK_PID" || say "   the HTTP sink responder did not start"
}

start_kafka_mock() {
  "$EX/kafka_mock" >"$WORK/kafka.txt" 2>&1 &
  KAFKA_PID=$!
  PIDS+=("$KAFKA_PID")
  local i
  for i in $(seq 1 200); do grep -q '^bootstrap.servers=' "$WORK/kafka.txt" && break; sleep 0.05; done
  KAFKA_BOOTSTRAP=$(sed -n 's/^bootstrap.servers=//p' "$WORK/kafka.txt")
}

# ---------------------------------------------------------------- run
KAFKA_BOOTSTRAP=127.0.0.1:9092
# Other work on the machine moves every number: the table says how loaded it was.
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
# The ratio column needs the floor: measure it first even when not asked for.
[[ " ${ROWS[*]} " == *" bare "* ]] || ROWS=(bare "${ROWS[@]}")
for row in "${ROWS[@]}"; do
  say "== $row"
  case $row in
    bare) row_bare ;;
    unrouted) row_router unrouted direct none ;;
    direct-file) row_router direct-file direct file ;;
    direct-file-os) row_router direct-file-os direct file-os ;;
    spool-file) row_router spool-file spool file ;;
    spool-http)
      start_sink_responder
      row_router spool-http spool http
      stop "$SINK_PID" ;;
    spool-amqp) row_router spool-amqp spool amqp ;;
    spool-kafka)
      start_kafka_mock
      row_router spool-kafka spool kafka
      stop "$KAFKA_PID" ;;
    *) say "unknown row $row (rows: ${ALL_ROWS[*]})"; exit 2 ;;
  esac
done

# ---------------------------------------------------------------- table
cpu=$(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)
echo
echo "$(date -u '+%Y-%m-%d %H:%M UTC'), load average before $LOAD_BEFORE, after $(cut -d' ' -f1-3 /proc/loadavg), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo '+dirty'), $(nproc) cores ($cpu), $(uname -r)"
echo "wrk -t$THREADS -c$CONNS -d$DURATION --latency, distinct payloads (bench/webio.lua); load generator and server share the cores"
echo
echo "| setup | req/s | ratio to bare | p50 | p99 | non-2xx | p99 at ½ rate (achieved) | peak RSS | idle RSS | start→ready |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
for row in "${ROWS[@]}"; do echo "${R_CELLS[$row]:-| $row | not run | | | | | | | | |}"; done
echo
echo "Ratio to bare: median of $REPEAT back-to-back pairs (bare run, then router run). Every pair:"
for row in "${ROWS[@]}"; do
  [ "$row" != bare ] && [ -n "${R_RATIOS[$row]:-}" ] || continue
  echo "- $row:${R_RATIOS[$row]}"
done
for row in "${ROWS[@]}"; do
  [ -n "${R_SETTLE[$row]:-}" ] || continue
  echo "- $row: the spool's backlog before the half-rate run took ${R_SETTLE[$row]} to deliver"
done

# ---------------------------------------------------------------- targets
echo
echo "Targets (router rows):"
# Issue 14's done-when: ratios (median of the pairs), p99 at half rate ≤ 5 ms and peak RSS ≤ 48 MiB
# in every row; idle RSS and start-to-ready as before.
target_ratio() { case $1 in unrouted) echo 0.85 ;; direct-file) echo 0.7 ;; spool-file) echo 0.5 ;; spool-amqp | spool-kafka) echo 0.35 ;; *) echo "" ;; esac; }
for row in "${ROWS[@]}"; do
  [ "$row" != bare ] || continue
  if [ -z "${R_RPS[$row]:-}" ]; then echo "- $row: not measured"; continue; fi
  want=$(target_ratio "$row")
  ready_ms=${R_READY[$row]% ms}
  awk -v row="$row" -v r="${R_RATIO[$row]}" -v b=1 -v want="$want" -v p99h="${R_P99HALF[$row]}" \
      -v peak="${R_PEAK[$row]}" -v idle="${R_IDLE[$row]}" -v ready="$ready_ms" -v bad="${R_NON2XX[$row]}" 'BEGIN {
    ok = (bad == 0); msg = (bad == 0) ? "" : sprintf(" %d non-2xx or socket errors;", bad)
    if (want != "") { t = (r / b >= want); ok = ok && t; msg = msg sprintf(" ratio %.2f %s %s;", r / b, t ? ">=" : "<", want) }
    t = (p99h <= 5000); ok = ok && t; msg = msg sprintf(" p99@half %.2f ms %s 5;", p99h / 1000, t ? "<=" : ">")
    t = (peak <= 49152); ok = ok && t; msg = msg sprintf(" peak %.1f MiB %s 48;", peak / 1024, t ? "<=" : ">")
    t = (idle <= 16384); ok = ok && t; msg = msg sprintf(" idle %.1f MiB %s 16;", idle / 1024, t ? "<=" : ">")
    t = (ready <= 100); ok = ok && t; msg = msg sprintf(" ready %.1f ms %s 100", ready, t ? "<=" : ">")
    printf "- %s: %s:%s\n", row, ok ? "met" : "MISSED", msg
  }'
done
